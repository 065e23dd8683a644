"""The sections of the config tree, one pydantic model each; field defaults = ``pyproject.toml``.

Units are in the names or the comments: ``*_hz``, ``*_w`` (watts), ``*_db``, ``*_bps``
(bits per second), ``*_bits``; learning rates are per optimizer step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BeforeValidator, Field, Strict, TypeAdapter, field_validator, model_validator

from pwff_app.config.base import (
    AGGREGATION_KEYS,
    Aggregator,
    Allocation,
    Bool,
    Float,
    Int,
    DownlinkMiss,
    FedbertTrain,
    LossModel,
    MaskRule,
    NonNegative,
    NonNegativeInt,
    NumberList,
    Positive,
    PositiveInt,
    Scalar,
    Scenario,
    Section,
    Str,
    section,
    _number_list,
    _weight_pairs,
)

Direction = Literal["up", "down"]
_AG_NEWS_LABELS = 4  # pwff_app.task_tuning.data.AG_NEWS_CLASSES (config/ stays free of torch)


def _sparsity(value: Any) -> Any:
    """``"adaptive"`` as is, else a comma list of numbers (:data:`NumberList`)."""
    return value if value == "adaptive" else _number_list(value)


Sparsity = Annotated[tuple[float, ...] | Literal["adaptive"], BeforeValidator(_sparsity)]


@section
class AggregationConfig(Section):
    """How the server combines replies: Flower's FedAvg, FedMedian or FedTrimmedAvg, and reply checks."""

    aggregator: Aggregator = "fedavg"
    trim_fraction: Annotated[float, Strict(), Field(ge=0, lt=0.5)] = 0.2  # trimmed-mean: share cut at each end
    max_update_norm: NonNegative = 0.0  # L2 bound on (reply - global); 0 = off
    max_num_examples: NonNegativeInt = 0  # bound on a reply's num-examples; 0 = from the config (checks.py)
    min_survivors: PositiveInt = 1  # fewer valid replies: the global stays

    @classmethod
    def section_input(cls, rc: Mapping[str, Scalar]) -> dict[str, Scalar]:
        return {k: rc[k] for k in AGGREGATION_KEYS if k in rc}  # top-level keys, no prefix

    def trimmed_per_side(self, num_replies: int) -> int:
        """Replies FedTrimmedAvg cuts at each end: ``int(trim_fraction * n)`` (Flower's rule)."""
        return int(self.trim_fraction * num_replies)


@section
class DPConfig(Section):
    """Client-side DP of the shared update: clip to ``clipping_norm`` (L2), noise std = multiplier x clip / n."""

    SECTION: ClassVar[str] = "dp"
    noise_multiplier: NonNegative = 0.0  # 0 = off
    clipping_norm: Positive = 1.0

    @property
    def enabled(self) -> bool:
        return self.noise_multiplier > 0


@section
class TaskConfig(Section):
    """Task tuning (PFTT and contenders): model, data, local training."""

    SECTION: ClassVar[str] = "task"
    num_rounds: PositiveInt = 5
    model_name: Str = ""  # "" = offline all-MiniLM-L6-v2; any HF encoder id or path
    dataset: Str = "fancyzhx/ag_news"  # Hub id, used when no data folder is set
    alpha: Positive = 0.5  # Dirichlet concentration over labels (smaller = more skew)
    max_train_samples: NonNegativeInt = 400  # per client, 0 = all
    max_test_samples: NonNegativeInt = 300  # per client, 0 = all
    max_length: PositiveInt = 64  # tokens
    batch_size: PositiveInt = 32
    local_epochs: PositiveInt = 1
    lr: Positive = 0.002
    backbone_lr: Positive = 5e-5  # used instead of lr when a method trains the encoder itself
    adapter_size: PositiveInt = 64  # bottleneck width of the shared adapters
    lora_rank: PositiveInt = 8  # at resource level 1.0
    lora_alpha: PositiveInt = 16
    resource_levels: NumberList = (1.0, 0.8, 1.0, 0.8)  # per client (cycled), in (0, 1]
    # The global test set: rows of AG News's test split, as many of each label, the same for every client.
    global_test_samples: NonNegativeInt = 200  # 0 = no global evaluation; else a multiple of the 4 labels
    global_eval_every: NonNegativeInt = 0  # also every k rounds; 0 = the final round only

    @field_validator("global_test_samples")
    @classmethod
    def _balanced(cls, n: int) -> int:
        if n % _AG_NEWS_LABELS:
            raise ValueError(f"must be a multiple of the {_AG_NEWS_LABELS} labels (balanced), got {n}")
        return n

    def global_eval(self, server_round: int) -> bool:
        """Whether round ``server_round`` also evaluates on the global test set: the last round,
        and every ``global_eval_every`` rounds; never when ``global_test_samples`` is 0."""
        every = self.global_eval_every
        return self.global_test_samples > 0 and (
            server_round == self.num_rounds or (every > 0 and server_round > 0 and server_round % every == 0))

    @field_validator("resource_levels")
    @classmethod
    def _levels_in_range(cls, levels: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0 < r <= 1 for r in levels):
            raise ValueError(f"values must be in (0, 1], got {levels}")
        return levels

    def resource_level(self, client_id: int) -> float:
        """Resource level of a client in (0, 1]; the list is cycled over client ids."""
        return self.resource_levels[client_id % len(self.resource_levels)]


@section
class InstructConfig(Section):
    """Instruction tuning (PFIT and contenders). Defaults fit 4 clients on 2 cores.

    ``trainer``, ``eval_model``, ``use_lora``, ``personal_start`` and ``eval_seed`` are no
    run-config keys: the method's row in :data:`pwff_app.methods.METHODS` sets them (:meth:`for_method`).
    """

    SECTION: ClassVar[str] = "instruct"
    num_rounds: PositiveInt = 5
    policy_name: Str = ""  # "" = SmolLM2-135M-Instruct (offline GGUF if installed, else Hub); id / folder / .gguf
    prompt_dataset: Str = "tatsu-lab/alpaca"  # Alpaca's Hub id, used when no data folder is set
    preference_dataset: Str = "Anthropic/hh-rlhf"  # HH-RLHF's Hub id (helpful-base / harmless-base), likewise
    max_new_tokens: PositiveInt = 24  # response length cap, tokens
    prompts_per_round: PositiveInt = 16  # distinct prompts per client, split over ppo_steps rollout batches
    samples_per_prompt: PositiveInt = 4  # responses per prompt (group baseline)
    ppo_steps: PositiveInt = 4  # rollout + PPO update steps per round
    ppo_epochs: PositiveInt = 2  # PPO epochs per rollout batch
    eval_prompts: PositiveInt = 16  # fixed held-out prompts, the same for every client
    eval_samples: PositiveInt = 8  # sampled responses per held-out prompt
    eval_split: Literal["test", "validation"] = "test"  # Alpaca split evaluated: test (report) | validation (tune)
    sparsity: Sparsity = (0.4,)  # per client, cycled: share of attention weights not updated, in [0, 1); or "adaptive"
    mask_rule: MaskRule = "magnitude"
    reward_weights: Annotated[tuple[tuple[float, float], ...], BeforeValidator(_weight_pairs)] = (
        (0.8, 0.2), (0.2, 0.8))  # per client (w_help, w_safe), cycled
    reward_models: Literal["both", "helpfulness"] = "both"
    mu: NonNegative = 0.01  # proximal weight toward the global
    lr: Positive = 2e-4  # Adam step size
    kl_coef: NonNegative = 0.05  # per-token KL penalty to the pretrained reference
    temperature: Positive = 0.7  # sampling temperature (rollouts and held-out evaluation)
    gae_lambda: Annotated[float, Strict(), Field(ge=0, le=1)] = 1.0
    lora_rank: PositiveInt = 8  # LoRA rank when the method uses LoRA (shepherd)
    sft_epochs: PositiveInt = 2  # shepherd: supervised epochs over a round's prompts-per-round records
    trainer: Literal["ppo", "sft"] = "ppo"  # the method's row: PPO on rewards, or supervised (Shepherd)
    eval_model: Literal["local", "global"] = "local"  # the method's row: whose model a client evaluates
    use_lora: Bool = False
    personal_start: Bool = True
    eval_seed: Int = 1234

    @field_validator("sparsity")
    @classmethod
    def _sparsity_in_range(cls, values: tuple[float, ...] | str) -> tuple[float, ...] | str:
        if values != "adaptive" and any(not 0.0 <= s < 1.0 for s in values):
            raise ValueError(f"must be a comma list of numbers in [0, 1), got {values}")
        return values

    @model_validator(mode="after")
    def _steps_fit(self) -> InstructConfig:
        if self.prompts_per_round < self.ppo_steps:
            raise ValueError(f"'instruct.prompts-per-round' ({self.prompts_per_round}) must be >= "
                             f"'instruct.ppo-steps' ({self.ppo_steps})")
        return self

    def for_method(self, method: str) -> InstructConfig:
        """The settings a method actually uses: its row's overrides (paper V-B, Fig. 4)."""
        from pwff_app.methods import METHODS

        return dataclasses.replace(self, **METHODS[method].instruct_overrides)

    @property
    def bundle_lora_rank(self) -> int:
        return self.lora_rank if self.use_lora else 0

    @property
    def prompts_per_step(self) -> int:
        return math.ceil(self.prompts_per_round / self.ppo_steps)

    @property
    def adaptive_sparsity(self) -> bool:
        """``instruct.sparsity = "adaptive"``: the server picks each client's s per round from the channel."""
        return self.sparsity == "adaptive"

    def client_sparsity(self, client_id: int) -> float:
        """A client's configured s (with ``adaptive``, the densest of the ladder: the server's choice
        reaches the client in the train message)."""
        if self.adaptive_sparsity:
            from pwff_app.compression.adaptive import SPARSITY_LADDER

            return SPARSITY_LADDER[0]
        return self.sparsity[client_id % len(self.sparsity)]

    def client_weights(self, client_id: int) -> tuple[float, float]:
        """(w_help, w_safe) of a client; with only the helpfulness model, (1, 0)."""
        if self.reward_models == "helpfulness":
            return (1.0, 0.0)
        return self.reward_weights[client_id % len(self.reward_weights)]

    def ppo_config(self) -> Any:
        """The PPO trainer's config (:class:`pwff_app.instruct.ppo.PPOConfig`) for these settings."""
        from pwff_app.instruct.ppo import PPOConfig

        b = self.prompts_per_step * self.samples_per_prompt  # sequences per rollout batch
        return PPOConfig(lr=self.lr, batch_size=b, mini_batch_size=min(8, b), ppo_epochs=self.ppo_epochs,
                         kl_coef=self.kl_coef, mu=self.mu, max_new_tokens=self.max_new_tokens,
                         temperature=self.temperature, lam=self.gae_lambda,
                         samples_per_prompt=self.samples_per_prompt)


@section
class FedbertConfig(Section):
    """FedBERT split learning: ``split_layer`` encoder layers on the client; ``lr`` 0 = the mode's default."""

    SECTION: ClassVar[str] = "fedbert"
    split_layer: NonNegativeInt = 2
    train: FedbertTrain = "full"  # full (all but token embeddings) | all | adapter
    lr: NonNegative = 0.0  # 0 = 5e-5 for full/all, task.lr for adapter


@section
class ChannelConfig(Section):
    """Wireless link settings: Rayleigh block fading (``docs/wireless.md``) or a 3GPP cell (``docs/radio.md``).

    ``enabled`` False = an ideal link: nothing delayed, lost or spent. ``seed`` (the run's)
    keys the fading draws. ``snr_db`` is the average receive SNR in dB per client, cycled by
    client id (both directions). ``bandwidth_hz`` is each client's orthogonal band in Hz.
    ``client_power_w`` / ``server_power_w`` are transmit powers in W (energy only: the SNR is
    set directly). ``loss_model``: ``packet`` (per-packet errors with ``waterfall_db`` and at
    most ``max_retx`` retransmissions of ``packet_bits``-bit packets), ``outage`` (lost below
    ``target_rate_bps``) or ``none``. ``downlink_miss``: ``stale`` (train on the last copy) or
    ``skip`` (sit the round out). ``realtime`` sleeps the simulated delays.

    ``scenario`` ``uma`` / ``umi`` / ``rma`` drops the clients in a TR 38.901 cell
    (:mod:`pwff_app.wireless.cell`): ``bandwidth_hz`` is then the cell's total band, shared by
    the clients a round schedules (``allocation``); ``cell_radius_m`` (0 = the scenario's
    TR 38.901 inter-site distance / sqrt 3) and ``num_rings`` of interfering cells around it, ``cell_load`` of their band in use;
    ``bs_antenna_gain_dbi`` of the base station's antenna (dBi, both directions);
    ``carrier_frequency_hz``, ``subcarrier_spacing_hz``; open-loop uplink power control
    (``pc_p0_dbm``, ``pc_alpha``, ``ut_max_power_dbm``); link adaptation to ``bler_target``;
    ``max_retx`` HARQ retransmissions; ``bs_power_dbm`` is the base station's total downlink power (dBm).
    ``snr_db``, ``client_power_w``, ``server_power_w``, ``loss_model``, ``packet_bits``,
    ``waterfall_db`` and ``target_rate_bps`` belong to ``rayleigh`` only. ``deadline_s`` (0 = none): an update not
    received this many seconds after its round's downlink is dropped as late.
    """

    SECTION: ClassVar[str] = "wireless"
    TOP_LEVEL: ClassVar[tuple[str, ...]] = ("seed",)
    enabled: Bool = True
    seed: Int = 42
    snr_db: NumberList = (5.0,)
    bandwidth_hz: Positive = 1e6
    client_power_w: Positive = 0.2
    server_power_w: Positive = 1.0
    loss_model: LossModel = "packet"
    packet_bits: PositiveInt = 8192
    waterfall_db: Float = -10.0
    max_retx: NonNegativeInt = 3
    target_rate_bps: Positive = 1e6
    downlink_miss: DownlinkMiss = "stale"
    realtime: Bool = False
    deadline_s: NonNegative = 0.0  # round deadline in s from the round's downlink; 0 = none
    scenario: Scenario = "rayleigh"  # rayleigh | uma | umi | rma (TR 38.901 cell, docs/radio.md)
    allocation: Allocation = "equal"  # 3GPP: equal | proportional-fair share of the band per round
    cell_radius_m: NonNegative = 0.0  # 3GPP: hexagon radius in m; 0 = TR 38.901 Table 7.2-1 ISD / sqrt(3)
    num_rings: PositiveInt = 1  # 3GPP: rings of interfering cells around the server's
    cell_load: Annotated[float, Strict(), Field(ge=0, le=1)] = 1.0  # 3GPP: share of the other cells' band in use
    bs_antenna_gain_dbi: Float = 8.0  # 3GPP: base station antenna gain (TR 38.901 Table 7.3-1 element maximum)
    carrier_frequency_hz: Positive = 3.5e9  # 3GPP
    subcarrier_spacing_hz: Positive = 30e3  # 3GPP: NR numerology 1 (slot 0.5 ms)
    pc_p0_dbm: Float = -90.0  # 3GPP: open-loop power control P0, target rx power per PRB (TS 38.213 7.1.1)
    pc_alpha: Annotated[float, Strict(), Field(ge=0, le=1)] = 1.0  # 3GPP: path-loss compensation factor
    ut_max_power_dbm: Float = 23.0  # 3GPP: UE power class 3 (TS 38.101-1 6.2.1)
    bler_target: Annotated[float, Strict(), Field(gt=0, lt=1)] = 0.1  # 3GPP: link adaptation's BLER target
    bs_power_dbm: Float = 46.0  # 3GPP: base station total downlink power, dBm (TR 36.814 Table A.2.1.1-2, 10 MHz macro)

    RAYLEIGH_ONLY: ClassVar[tuple[str, ...]] = (
        "snr_db", "client_power_w", "server_power_w", "loss_model", "packet_bits", "waterfall_db", "target_rate_bps")
    CELL_ONLY: ClassVar[tuple[str, ...]] = (
        "allocation", "cell_radius_m", "num_rings", "cell_load", "bs_antenna_gain_dbi", "carrier_frequency_hz", "subcarrier_spacing_hz",
        "pc_p0_dbm", "pc_alpha", "ut_max_power_dbm", "bler_target", "bs_power_dbm")

    @property
    def cell(self) -> bool:
        """Whether the link is a 3GPP cell (``uma``, ``umi``, ``rma``) rather than ``rayleigh``."""
        return self.scenario != "rayleigh"

    def ignored(self) -> list[str]:
        """Flat keys set away from their default that this scenario does not use."""
        default = ChannelConfig()
        unused = self.RAYLEIGH_ONLY if self.cell else self.CELL_ONLY
        return [f"wireless.{name.replace('_', '-')}" for name in unused if getattr(self, name) != getattr(default, name)]

    def client_snr_db(self, client_id: int) -> float:
        """Average SNR in dB of a client's link (the list is cycled over client ids)."""
        return self.snr_db[client_id % len(self.snr_db)]

    def power_w(self, direction: Direction) -> float:
        """Transmit power in W of the sender in ``direction`` (client up, server down)."""
        return self.client_power_w if direction == "up" else self.server_power_w

    def as_run_config(self) -> dict[str, Scalar]:
        """The settings as flat run-config keys (for ``summary.json``)."""
        flat: dict[str, Scalar] = {"seed": self.seed}
        for name, value in TypeAdapter(ChannelConfig).dump_python(self, by_alias=True).items():
            if name != "seed":
                flat[f"wireless.{name}"] = ",".join(f"{s:g}" for s in value) if name == "snr-db" else value
        return flat


ADAPTIVE = "adaptive"
DownlinkCodec = Literal["none", "fp16", "bf16"]


@section
class CompressionConfig(Section):
    """Compressed updates (``pwff_app/compression``, ``docs/compression.md``).

    ``uplink``: ``none | fp16 | bf16 | int8 | int4 | topk:<f> | adaptive`` (the server picks per
    client and round the finest codec whose expected uplink time fits ``wireless.deadline-s``,
    else ``target_delay_s`` in s). ``downlink``: ``none | fp16 | bf16``, a cast of the broadcast
    global. ``error_feedback``: lossy uplink codecs carry the unsent residual to the next round
    (private state). ``block_size``: elements per int8 / int4 scale (0 = one per tensor).
    """

    SECTION: ClassVar[str] = "compression"
    uplink: Str = "none"
    downlink: DownlinkCodec = "none"
    error_feedback: Bool = True
    block_size: NonNegativeInt = 256
    target_delay_s: NonNegative = 0.0  # adaptive without a deadline: the uplink time to fit, s

    @field_validator("uplink")
    @classmethod
    def _known_codec(cls, text: str) -> str:
        from pwff_app.compression.codecs import parse_codec  # numpy only: the config stays torch-free

        if text != ADAPTIVE:
            parse_codec(text)
        return text

    @property
    def adaptive(self) -> bool:
        return self.uplink == ADAPTIVE

    @property
    def enabled(self) -> bool:
        """Whether anything is encoded (uplink or downlink)."""
        return self.uplink != "none" or self.downlink != "none"

    def codec(self, name: str | None = None) -> Any:
        """The :class:`~pwff_app.compression.codecs.Codec` of ``name`` (default: the fixed uplink codec)."""
        from pwff_app.compression.codecs import parse_codec

        return parse_codec(self.uplink if name is None else name, self.block_size)

    def sent_norm_bounded(self) -> bool:
        """Whether the sent update's L2 norm never exceeds the clipped update's (DP's sensitivity):
        top-k without error feedback (a subset of its entries), or no uplink codec."""
        return self.uplink == "none" or (self.uplink.startswith("topk:") and not self.error_feedback)
