"""The server's GPU memory gauge: exported per device where the process has CUDA, absent otherwise."""
import sys
import types

from lifecycle.serve.metrics import ServeMetrics


def test_gpu_memory_is_exported_per_device_only_with_cuda(monkeypatch):
    assert b"lifecycle_gpu_memory_bytes" not in ServeMetrics().render()[0]  # this machine: no CUDA
    cuda = types.SimpleNamespace(is_available=lambda: True, device_count=lambda: 2,
                                 memory_allocated=lambda i: 1000 * (i + 1))
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    text = ServeMetrics().render()[0].decode()
    assert 'lifecycle_gpu_memory_bytes{device="0"} 1000.0' in text
    assert 'lifecycle_gpu_memory_bytes{device="1"} 2000.0' in text
