"""The corpus profile's histograms and shares agree with a direct computation."""
import numpy as np

from lifecycle.data.profile import LENGTH_BINS, Profile


def test_profile_matches_numpy():
    rng = np.random.default_rng(0)
    profile = Profile(vocab_size=50)
    docs = [rng.integers(0, 50, rng.integers(1, 3000)) for _ in range(200)]
    for i, ids in enumerate(docs):
        profile.add("code" if i % 4 else "prose", 4 * ids.size, ids)
    out = profile.to_dict()
    sizes = np.array([d.size for d in docs])
    assert out["doc_tokens_hist"] == np.histogram(sizes, bins=LENGTH_BINS)[0].tolist()
    assert out["token_frequencies"] == np.bincount(np.concatenate(docs), minlength=50).tolist()
    assert out["kind_share_docs"] == {"code": 0.75, "prose": 0.25}
    assert out["doc_tokens_quantiles"]["p50"] == np.quantile(sizes, 0.5)
    assert out["documents"] == 200 and out["tokens"] == sizes.sum()
