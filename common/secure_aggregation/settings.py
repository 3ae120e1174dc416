"""The protocol's settings: threshold, tolerated dropouts, ring and quantisation.

Fields carry their help in ``metadata`` as common/config.py's sections do, and ``__post_init__``
refuses a bad value in one line, so the class can become a config section as it is. What depends
on the number of institutions of a round is checked per round (``check_round``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from fedlora.common.errors import ConfigError

KEY = "secure_aggregation"
RING_BITS = (32, 64)


@dataclass(frozen=True)
class SecAggConfig:
    threshold: int | None = field(
        default=None,
        metadata={
            "help": "Shares needed to reconstruct a mask secret; every step of a round needs this many "
            "institutions left. None: the least above (n + tolerated_colluders) / 2."
        },
    )
    tolerated_dropouts: int = field(
        default=0,
        metadata={"help": "Institutions that may drop out of a round and still leave threshold ones."},
    )
    tolerated_colluders: int = field(
        default=0,
        metadata={
            "help": "Institutions that may side with the coordinator: they sign any survivor list, so the "
            "threshold must exceed (institutions + colluders) / 2 for two lists never to both gather it."
        },
    )
    ring_bits: int = field(
        default=32,
        metadata={
            "help": "Masked values live in Z_2^ring_bits (32 or 64): 32 halves the bytes on the wire and "
            "leaves 2^32 / n levels per value, ample for 24-bit quantisation of up to 256 institutions."
        },
    )
    quantisation_bits: int = field(
        default=24,
        metadata={"help": "Each value is rounded to one of 2^bits - 1 steps across [-clip, clip]."},
    )
    clip: float = field(
        default=8.0,
        metadata={"help": "Values are clipped to [-clip, clip] before quantisation (after any DP noise)."},
    )

    def __post_init__(self) -> None:
        if self.threshold is not None and (not isinstance(self.threshold, int) or self.threshold < 2):
            raise ConfigError(f"{KEY}.threshold: must be an integer >= 2 or None, got {self.threshold!r}")
        if not isinstance(self.tolerated_colluders, int) or self.tolerated_colluders < 0:
            raise ConfigError(
                f"{KEY}.tolerated_colluders: must be an integer >= 0, got {self.tolerated_colluders!r}"
            )
        if not isinstance(self.tolerated_dropouts, int) or self.tolerated_dropouts < 0:
            raise ConfigError(
                f"{KEY}.tolerated_dropouts: must be an integer >= 0, got {self.tolerated_dropouts!r}"
            )
        if self.ring_bits not in RING_BITS:
            raise ConfigError(f"{KEY}.ring_bits: must be 32 or 64, got {self.ring_bits!r}")
        if not isinstance(self.quantisation_bits, int) or not 1 <= self.quantisation_bits < self.ring_bits:
            raise ConfigError(
                f"{KEY}.quantisation_bits: must be an integer in [1, ring_bits - 1 = {self.ring_bits - 1}], "
                f"got {self.quantisation_bits!r}"
            )
        if not isinstance(self.clip, int | float) or not 0 < self.clip < float("inf"):
            raise ConfigError(f"{KEY}.clip: must be a finite number > 0, got {self.clip!r}")

    def threshold_for(self, institutions: int) -> int:
        """The round's threshold among ``institutions`` taking part."""
        smallest = (institutions + self.tolerated_colluders) // 2 + 1
        return self.threshold if self.threshold is not None else smallest

    def majority(self, threshold: int, institutions: int) -> bool:
        """Whether ``threshold`` exceeds (institutions + colluders) / 2: then two survivor lists can never
        both gather threshold signatures (each honest institution signs one, a colluder both; Bell et
        al. 2020), nor threshold shares (each answers once), so no seed and key of one peer both open."""
        return 2 * threshold > institutions + self.tolerated_colluders

    def check_round(self, institutions: int) -> int:
        """The threshold of a round of ``institutions``, refused in one line where the round could not
        complete with the tolerated dropouts, a minority could unmask, or the sum could overflow."""
        threshold = self.threshold_for(institutions)
        if not self.majority(threshold, institutions):
            least = (institutions + self.tolerated_colluders) // 2 + 1
            raise ConfigError(
                f"{KEY}.threshold: {threshold} of {institutions} institutions with "
                f"{self.tolerated_colluders} tolerated colluders is not above (institutions + colluders) / 2 "
                f"(colluders sign any survivor list; Bell et al. 2020); expected at least {least}"
            )
        if threshold > institutions - self.tolerated_dropouts:
            raise ConfigError(
                f"{KEY}.threshold: {threshold} exceeds the {institutions} institutions less "
                f"{self.tolerated_dropouts} tolerated dropouts; expected at most "
                f"{institutions - self.tolerated_dropouts}"
            )
        self.check_capacity(institutions)
        return threshold

    def check_capacity(self, institutions: int) -> None:
        """Refuse in one line a round whose sum of quantised values could wrap around the ring."""
        levels = 2**self.quantisation_bits - 1
        if institutions * levels >= 2**self.ring_bits:
            most = (2**self.ring_bits - 1) // institutions
            raise ConfigError(
                f"{KEY}.quantisation_bits: {institutions} institutions x (2^{self.quantisation_bits} - 1) "
                f"levels overflow the ring 2^{self.ring_bits}; expected quantisation_bits <= "
                f"{(most + 1).bit_length() - 1} or ring_bits: 64"
            )


# Round 0's class statistics (sums of unit vectors, and counts): values up to a class's rows, so a wide
# range at a fine step. 40-bit levels over [-2^20, 2^20] step 1.9e-6 per value; 64-bit ring: up to 2^24
# institutions before a sum could wrap.
STATISTICS_CLIP = 2.0**20
STATISTICS_RING_BITS = 64
STATISTICS_QUANTISATION_BITS = 40


def for_statistics(
    threshold: int | None, tolerated_dropouts: int, tolerated_colluders: int
) -> SecAggConfig:
    """The settings of the round-0 statistics release under secure aggregation."""
    return SecAggConfig(
        threshold=threshold,
        tolerated_dropouts=tolerated_dropouts,
        tolerated_colluders=tolerated_colluders,
        ring_bits=STATISTICS_RING_BITS,
        quantisation_bits=STATISTICS_QUANTISATION_BITS,
        clip=STATISTICS_CLIP,
    )


def check_statistics_rows(rows: int) -> None:
    """Refuse in one line an institution with more training rows than round 0's quantisation range:
    one class could then hold them all, and its sums and count would be clipped at the range, silently
    (the quantiser clips), so the head would be built on wrong statistics. Checked on the row count,
    which the reply states anyway, before anything is charged or read."""
    if rows > STATISTICS_CLIP:
        raise ConfigError(
            f"secure aggregation: {rows:,} training rows; a class could exceed round 0's quantisation range "
            f"of {int(STATISTICS_CLIP):,} rows (common.secure_aggregation.settings.STATISTICS_CLIP) and be "
            "clipped; expected at most that many rows at one institution (split the data, or federate "
            "without federation.secure_aggregation)"
        )


# A head round's gradient sum (common.head_gradient): each row's gradient is clipped to L2 norm C, so every
# value of one institution's sum lies within rows x C, before its noise share. Round 0's range and levels
# serve (step 1.9e-6 per value, far below any noise share), in the 64-bit ring.
HEAD_GRADIENT_CLIP = STATISTICS_CLIP
# a noise share is drawn inside the range unless it exceeds this many of its standard deviations
# (probability below 1e-22 per value)
NOISE_MARGIN = 10.0


def for_head_gradient(
    threshold: int | None, tolerated_dropouts: int, tolerated_colluders: int
) -> SecAggConfig:
    """The settings of a head round's gradient sum under secure aggregation: round 0's ring and levels,
    over the head gradient's range."""
    settings = for_statistics(threshold, tolerated_dropouts, tolerated_colluders)
    return replace(settings, clip=HEAD_GRADIENT_CLIP)


def check_head_range(rows: int, clip: float, noise_std: float) -> None:
    """Refuse in one line a head gradient that the quantisation range could clip: its values are at most
    rows x C, plus a noise share of ``noise_std`` (NOISE_MARGIN of them); the quantiser would clip the
    rest silently and the head would step on a wrong sum. Checked before anything is charged or read."""
    bound = rows * clip + NOISE_MARGIN * noise_std
    if bound > HEAD_GRADIENT_CLIP:
        raise ConfigError(
            f"secure aggregation: a head gradient of {rows:,} rows x clip {clip:g} plus {NOISE_MARGIN:g} "
            f"noise std {noise_std:.3g} reaches {bound:,.0f}, beyond the quantisation range of "
            f"{int(HEAD_GRADIENT_CLIP):,} (common.secure_aggregation.settings.HEAD_GRADIENT_CLIP); expected "
            "fewer rows or a smaller privacy.max_grad_norm at one institution"
        )
