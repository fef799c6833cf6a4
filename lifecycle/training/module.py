"""The one LightningModule for causal-LM training: pretraining and every fine-tuning strategy share it."""
from __future__ import annotations

import functools
import random
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from torchmetrics import MeanMetric
from torchmetrics.text import Perplexity

from lifecycle.errors import ConfigError, NonFiniteLossError
from lifecycle.training import fused
from lifecycle.training.loss import IGNORE, linear_cross_entropy, plain_head


class CausalLM(LightningModule):
    """Next-token cross-entropy on {"input_ids", "labels"} batches (labels already shifted, -100 ignored).

    With a `teacher`, training minimises distill_alpha·T²·KL(teacher_T ‖ model_T) + (1 - distill_alpha)·CE on
    temperature-T-softened logits (Hinton et al., 2015); validation still reports plain cross-entropy. Without one,
    a model whose logits are a plain projection of its last hidden state trains on `linear_cross_entropy`, which
    never materialises the full logits (same loss and gradients to float rounding). With `fused_ops` (and without
    `compile`), Llama-layout models train with fused RMSNorm, rope, SwiGLU and causal attention
    (lifecycle/training/fused.py) from fit start to fit end; the teacher never does.
    """

    def __init__(self, model: torch.nn.Module, optimizer: Callable, scheduler: Callable, nonfinite: str = "halt",
                 max_skipped_steps: int = 5, restore_rng: bool = True, teacher: torch.nn.Module | None = None,
                 distill_temperature: float = 2.0, distill_alpha: float = 0.5, compile: bool = False,
                 fused_ops: bool = True):
        super().__init__()
        self.model, self.optimizer_factory, self.scheduler_factory = model, optimizer, scheduler
        # (decoder, lm_head) in a tuple, so they are not registered twice (checkpoint keys stay model.*)
        self._head = plain_head(model) if teacher is None else None
        if compile:  # in place: parameter names, checkpoints and save_pretrained stay those of the eager model
            (self._head[0] if self._head else self.model).compile()
        self.fused_ops = fused_ops and not compile  # inductor fuses these itself
        # A frozen submodule so it follows the student across devices; its weights also ride in checkpoints.
        self.teacher = teacher.requires_grad_(False).eval() if teacher is not None else None
        self.distill_temperature, self.distill_alpha = distill_temperature, distill_alpha
        self.nonfinite, self.max_skipped_steps, self.restore_rng = nonfinite, max_skipped_steps, restore_rng
        self.val_loss = MeanMetric()
        self.val_ppl = Perplexity(ignore_index=IGNORE)
        self.skipped_in_a_row = 0
        self._pending_rng: dict | None = None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, P + T, V)
        # Prompt-learning strategies (P-tuning, prompt tuning) prepend P virtual tokens: score the real ones.
        return logits[:, -input_ids.shape[1]:]                                           # (B, T, V)

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self(batch["input_ids"], batch.get("attention_mask"))                  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=IGNORE)
        return loss, logits

    def distill_loss(self, batch: dict[str, torch.Tensor], logits: torch.Tensor, ce: torch.Tensor) -> torch.Tensor:
        """The teacher's softened distribution matched on every labelled position, mixed with the hard-label CE."""
        with torch.no_grad():
            target = self.teacher(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
        mask, t = batch["labels"] != IGNORE, self.distill_temperature                   # (B, T)
        student = F.log_softmax(logits[mask].float() / t, dim=-1)                        # (N, V)
        teacher = F.log_softmax(target[:, -logits.shape[1]:][mask].float() / t, dim=-1)  # (N, V)
        kl = F.kl_div(student, teacher, log_target=True, reduction="batchmean")
        return self.distill_alpha * t * t * kl + (1 - self.distill_alpha) * ce

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # Lightning switches the whole module to train mode; the teacher must not drop out
        return self

    def train_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self._head is None:
            loss, logits = self.compute_loss(batch)
            return loss if self.teacher is None else self.distill_loss(batch, logits, loss)
        decoder, head = self._head
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                         use_cache=False).last_hidden_state                              # (B, T, H)
        return linear_cross_entropy(hidden, head.weight, batch["labels"])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        loss = self.train_loss(batch)
        if not torch.isfinite(loss):
            return self._on_nonfinite(loss)
        self.skipped_in_a_row = 0
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        return loss

    def _on_nonfinite(self, loss: torch.Tensor) -> None:
        step = self.global_step
        self.skipped_in_a_row += 1
        if self.nonfinite == "skip" and self.skipped_in_a_row <= self.max_skipped_steps:
            self.print(f"warning: step {step}: loss is {loss.item()}; skipping it "
                       f"({self.skipped_in_a_row}/{self.max_skipped_steps} in a row)")
            return None  # Lightning then skips backward; grads are None so the optimizer changes nothing
        ckpt = getattr(self.trainer.checkpoint_callback, "last_model_path", "") or "none yet"
        why = (f"{self.skipped_in_a_row} steps in a row (train.max_skipped_steps={self.max_skipped_steps})"
               if self.nonfinite == "skip" else "train.nonfinite=halt")
        raise NonFiniteLossError(f"step {step}: loss is {loss.item()}; stopping ({why}). Last good checkpoint: "
                                 f"{ckpt}. Try a lower optimizer.lr or trainer.gradient_clip_val, then resume "
                                 "with ckpt_path=last")

    def on_validation_epoch_start(self) -> None:
        # Fresh metric state in the current grad mode: a validate() before fit() leaves inference-mode tensors.
        self.val_loss.reset()
        self.val_ppl.reset()

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        loss, logits = self.compute_loss(batch)
        tokens = (batch["labels"] != IGNORE).sum()
        self.val_loss.update(loss, weight=tokens)
        self.val_ppl.update(logits.float(), batch["labels"])
        self.log("val/loss", self.val_loss, prog_bar=True)
        self.log("val/ppl", self.val_ppl)

    def configure_optimizers(self) -> dict[str, Any]:
        factory, keywords = self.optimizer_factory, self.optimizer_factory.keywords
        if keywords.get("fused") and self.trainer.precision == "16-mixed" and self.trainer.gradient_clip_val:
            # A fused step unscales the gradients itself, after Lightning must have clipped them: the GradScaler
            # path needs the unfused optimizer (Lightning refuses the combination otherwise).
            factory = functools.partial(factory, fused=False)
        optimizer = factory(params=weight_decay_groups(self.model, keywords.get("weight_decay", 0.0)))
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # Exact resume: the RNG states travel in the checkpoint and are restored just before training resumes.
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rng"] = rng_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._pending_rng = checkpoint.get("rng") if self.restore_rng else None

    def on_fit_start(self) -> None:
        if isinstance(self.trainer.strategy, (FSDPStrategy, DeepSpeedStrategy)):
            self._head = None  # lm_head.weight may be a shard outside lm_head's own forward there; untested
        if self.fused_ops:
            fused.patch(self.model)  # logs why not, where the model is not one it computes exactly

    def teardown(self, stage: str) -> None:
        if stage == "fit":
            fused.unpatch(self.model)  # the model leaves fit with its own forwards

    def on_train_start(self) -> None:
        self.model.train()  # from_pretrained returns eval mode; dropout must be live while training
        if self._pending_rng is not None:
            set_rng_state(self._pending_rng)
            self._pending_rng = None


def weight_decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only: biases, norm weights and embeddings are exempt."""
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and id(p) not in embedding_ids else no_decay).append(p)
    if not decay and not no_decay:
        raise ConfigError("strategy: no trainable parameters left; check the strategy config")
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def rng_state() -> dict[str, Any]:
    """Every RNG state as tensors and plain data (so checkpoints load with weights_only=True)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(),
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
