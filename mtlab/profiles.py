"""Run profiles: how much work a notebook, benchmark or `make report` does.

One switch (`PROFILE=smoke|default|full`) shrinks or grows every experiment, as
TransformerLens' notebooks do under CI:

- `smoke`   : seconds per notebook; CI runs every notebook this way. Numbers are not meaningful.
- `default` : what `make report` runs on a 2-core CPU; reads the shipped module bank and baselines.
- `scratch` : the default recipe, retraining the bank and baselines in the cache (hours on 2 cores).
- `full`    : paper-scale budgets, for a GPU: every ratio trained for the baselines, full
              dev/test decoding, 100k-token statistics.

Each experiment reads only its own section, so adding one is one dataclass and one field.
A profile's sections are recorded with every result (`asdict`). Its lists of registered names are
literal (a cache key must not depend on what was registered before this module was imported); each
registry entry names the profiles that run it (e.g. `mtlab.merging.methods.METHODS.meta("profiles")`),
and tests/test_registry.py checks that the two agree.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace

NAMES = ("smoke", "default", "scratch", "full")


@dataclass(frozen=True)
class ModularProfile:
    steps: int = 600                # module-replacing steps (ONE run for every granularity)
    batch_size: int = 64
    granularities: tuple[int, ...] = (2, 3, 6)
    baseline_steps: int = 600       # each baseline run gets the same steps and batch as the module run
    baseline_depths: tuple[int, ...] = (3,)   # per-stack depths the per-ratio baselines are trained for
    eval_limit: int | None = 1000   # words decoded per split (None: the whole split)
    latency_batches: tuple[int, ...] = (1, 64)
    latency_words: int = 64         # words timed per batch size
    latency_seconds: float = 0.5    # torch.utils.benchmark min_run_time per model and batch size
    latency_rounds: int = 3         # interleaved passes over all models; speed-up = median per-round ratio
    curve_every: int = 0            # dev scores of a few assemblies every N steps of the module run (0: none)
    shipped: bool = False           # read the bank and baselines shipped under data/ (verified against this
                                    # config) instead of training them in the cache


@dataclass(frozen=True)
class MergingProfile:
    align_tokens: int = 10_000      # tokens of train data for the FF correlations
    cka_tokens: int = 10_000        # tokens for the similarity heatmaps
    select_limit: int | None = 1000  # dev words scoring each window
    window_sizes: tuple[int, ...] = (2, 3)
    recovery_steps: int = 300
    eval_limit: int | None = None   # test words for the final table (None: all)
    minilm_sentences: int | None = 1000
    recovery_lr: float = 3e-4       # AdamW peak lr of the recovery fine-tune (10% warmup, cosine)
    recovery_batch_size: int = 64   # one budget (steps x batch) for every method
    window_starts: tuple[int, ...] | None = None  # only windows starting there (None: every window)
    combined_recovery_steps: int | None = None  # recovery of the combined candidates (4 of 12 FF sublayers and
                                    # layer pruning beside them; None: recovery_steps), same batch and lr
    shipped: bool = False           # read the combined candidates recovered at combined_recovery_steps from
                                    # data/merging (`make merges`, verified) instead of recovering them in the cache


@dataclass(frozen=True)
class ExploreProfile:
    screen_limit: int | None = 1000  # dev words the whole assembly space is screened on (teacher forcing)
    screen_batch: int = 64
    picks: int = 8                  # plans chosen off the screened frontier, besides the two ladders
    combined: int = 2               # assemblies that also get FF merges (size-first rungs near 1.5x and 2x)
    eval_limit: int | None = 1000   # dev and test words each frontier candidate is decoded on
    bench_limit: int = 128          # dev words of the per-plan vs prefix-shared benchmark


@dataclass(frozen=True)
class MiniLMProfile:
    """Both methods on all-MiniLM-L6-v2 (notebook 06). The `default` profile reads the runs shipped
    under data/minilm (`make minilm`: 500 steps at batch 32 per run) and only scores and times
    them; `scratch` retrains that recipe in the cache; `full`'s budget is 20,000 steps at batch 64
    per run (hours on a GPU), scored on the whole dev and test splits."""
    steps: int = 50                 # module-replacing steps (ONE run for every granularity); every baseline
    batch_size: int = 16            # and FF-merge recovery run gets the same steps and batch (13 runs)
    granularities: tuple[int, ...] = (2, 3, 6)
    module_lr: float = 3e-4         # modules (only they train; the original is frozen)
    finetune_lr: float = 1e-4       # whole-model fine-tunes: baselines and FF-merge recovery
    ratios: tuple[float, ...] = (1.5, 2.0, 3.0)   # layer-stack ratios the per-ratio baselines are trained for
    merge_targets: tuple[float, ...] = (0.10, 0.20)  # shares of parameters removed (minilm_ff_merging)
    merge_methods: tuple[str, ...] = ("permute", "vanilla")  # FF-merge methods (layer pruning always runs): the
                                    # registry entries naming this profile (`METHODS.meta("profiles")`)
    align_tokens: int = 10_000      # train tokens for the FF correlations of the merges
    train_sentences: int | None = None  # train sentences (None: the whole split, ~16.5k)
    select_limit: int | None = 200  # dev sentences (window choice, dev scores)
    eval_limit: int | None = 300    # test sentences every candidate is scored on (None: all ~2.1k)
    max_length: int = 64            # tokens per sentence (the corpus' sentences are 5-40 words)
    latency_batches: tuple[int, ...] = (1, 64)
    latency_seconds: float = 0.5    # torch.utils.benchmark min_run_time per model and batch size
    latency_rounds: int = 3         # interleaved passes over all models; speed-up = median per-round ratio
    freeze_word_embeddings: bool = False  # fine-tunes leave the 11.7M-parameter token embedding table as it is
    shipped: bool = False           # read the bank, baselines and merge recoveries shipped under data/minilm
                                    # (`make minilm`, verified against this config) instead of training them


@dataclass(frozen=True)
class YourModelProfile:
    """Notebook 07 (your model and data). `demo_steps` train the tiny demo GPT-2 used when no model
    is given; the rest are budgets of each step of the path."""
    demo_steps: int = 300           # language-modelling steps of the demo model (MODEL = None)
    granularities: tuple[int, ...] = (2, 3, 6)   # module sizes, fitted to the model's depth
    steps: int = 300                # module-replacing steps
    batch_size: int = 16            # every training run: modules, recovery
    lr: float = 5e-4                # modules
    cka_tokens: int = 5000          # train tokens for the similarity heatmap
    eval_limit: int | None = 200    # dev examples each model is scored on
    screen_limit: int | None = 200  # dev examples the assembly space is screened on
    search_budget: int | None = None  # frontier_search's block evaluations (encoder-decoders; None: screen all)
    window_sizes: tuple[int, ...] = (2, 3)   # FF-merge windows (those that fit the depth)
    align_tokens: int = 5000        # train tokens for the FF correlations
    recovery_steps: int = 100       # recovery fine-tune of the merged model
    recovery_lr: float = 3e-4


@dataclass(frozen=True)
class Profile:
    name: str = "default"
    modular: ModularProfile = field(default_factory=ModularProfile)
    merging: MergingProfile = field(default_factory=MergingProfile)
    explore: ExploreProfile = field(default_factory=ExploreProfile)
    minilm: MiniLMProfile = field(default_factory=MiniLMProfile)
    your_model: YourModelProfile = field(default_factory=YourModelProfile)

    def record(self) -> dict:
        return asdict(self)


# MiniLM's shipped recipe (data/minilm, `make minilm`): every run (the module run, each per-ratio baseline,
# each FF-merge recovery) 500 steps at batch 32 with the token embedding table frozen; scored on 300 test
# sentences. The report reads it (`default`); `scratch` retrains it in the cache.
_MINILM_REAL = dict(steps=500, batch_size=32, freeze_word_embeddings=True)

_REAL_BUDGET = dict(steps=20_000, batch_size=64, baseline_steps=20_000, baseline_depths=(4, 3, 2),
                    eval_limit=None, curve_every=2000)

PROFILES: dict[str, Profile] = {
    "smoke": Profile(
        "smoke",
        ModularProfile(steps=20, batch_size=16, baseline_steps=10, baseline_depths=(3,), eval_limit=32,
                       latency_batches=(1, 64), latency_words=8, latency_seconds=0.02, latency_rounds=1),
        MergingProfile(align_tokens=500, cka_tokens=500, select_limit=32, window_sizes=(3,), recovery_steps=5,
                       eval_limit=64, minilm_sentences=60, recovery_batch_size=16,
                       window_starts=(1,)),
        ExploreProfile(screen_limit=32, screen_batch=16, picks=2, combined=1, eval_limit=32, bench_limit=16),
        MiniLMProfile(steps=2, batch_size=4, ratios=(2.0,), merge_targets=(0.10,), merge_methods=("permute",),
                      align_tokens=200, train_sentences=32, select_limit=8, eval_limit=16, max_length=24,
                      latency_seconds=0.01, latency_rounds=1),
        YourModelProfile(demo_steps=30, granularities=(2, 4), steps=10, batch_size=8, cka_tokens=300,
                         eval_limit=8, screen_limit=8, window_sizes=(2,), align_tokens=300, recovery_steps=3),
    ),
    # default: the merge table must fit in ~6 minutes on 2 CPU cores, so only 3-layer windows
    # (what the combined 4-of-12 candidate needs), 300 dev words per window, 50 recovery steps,
    # 1000 test words; `full` searches sizes 2-4 on the whole splits.
    # default: the real-budget module bank and baselines (20,000 steps at batch 64 per run) are shipped
    # under data/ (`make modules`, `make baselines`) and scored on the full dev and test splits once;
    # the report reads them. `scratch` retrains the same recipe in the cache (hours on 2 CPU cores).
    # default merging: single windows get 50 recovery steps in the cache; the combined candidates get
    # 1,000 steps at batch 64 each, shipped under data/merging (`make merges`) and scored on the full splits.
    "default": Profile("default", ModularProfile(**_REAL_BUDGET, shipped=True),
                       merging=MergingProfile(select_limit=300, window_sizes=(3,), recovery_steps=50,
                                              eval_limit=1000, combined_recovery_steps=1000, shipped=True),
                       minilm=MiniLMProfile(**_MINILM_REAL, shipped=True)),
    "scratch": Profile("scratch", ModularProfile(**_REAL_BUDGET, shipped=False),
                       merging=MergingProfile(select_limit=300, window_sizes=(3,), recovery_steps=50,
                                              eval_limit=1000, combined_recovery_steps=1000, shipped=False),
                       minilm=MiniLMProfile(**_MINILM_REAL, shipped=False)),
    "full": Profile(
        "full",
        ModularProfile(steps=20_000, batch_size=128, baseline_steps=20_000, baseline_depths=(5, 4, 3, 2, 1),
                       eval_limit=None, latency_words=256, latency_seconds=2.0),
        MergingProfile(align_tokens=100_000, cka_tokens=100_000, select_limit=None, window_sizes=(2, 3, 4),
                       recovery_steps=3000, minilm_sentences=None),
        ExploreProfile(screen_limit=None, picks=16, combined=4, eval_limit=None, bench_limit=1000),
        MiniLMProfile(steps=20_000, batch_size=64, align_tokens=100_000, select_limit=None, eval_limit=None,
                      max_length=128, latency_seconds=2.0),
        YourModelProfile(steps=20_000, batch_size=64, cka_tokens=100_000, eval_limit=None, screen_limit=None,
                         window_sizes=(2, 3, 4), align_tokens=100_000, recovery_steps=3000),
    ),
}


def get_profile(name: str | Profile | None = None) -> Profile:
    """A profile by name; None reads $MTLAB_PROFILE (default 'default')."""
    if isinstance(name, Profile):
        return name
    name = name or os.environ.get("MTLAB_PROFILE", "default")
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}: use one of {NAMES} (PROFILE=... for make report)")
    return PROFILES[name]


__all__ = ["NAMES", "PROFILES", "Profile", "ModularProfile", "MergingProfile", "ExploreProfile", "MiniLMProfile",
           "YourModelProfile", "get_profile", "replace"]
