"""Names both sides of a message agree on; a change here is a protocol change."""

import math

ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
# server -> a client below the global rank (ArrayRecord): what its truncation drops, as LoRA factors
# of the global rank minus its own, for it to fold into its frozen base weights
FOLD = "fold"

# server -> client (ConfigRecord)
ROUND = "fedlora-round"  # the federation's absolute round, which a resumed run continues
FINGERPRINT = "fingerprint"
WIRE_DTYPE = "wire-dtype"
PROXIMAL_MU = "proximal-mu"
# what a train message asks for: absent, a LoRA round; STATISTICS, the round-0 class statistics
STAGE = "fedlora-stage"
STATISTICS = "statistics"
# the arrays of a statistics reply: per class the sum of normalised pooled embeddings, and the count
CLASS_SUMS = "class-sums"
CLASS_COUNTS = "class-counts"
# the L2 sensitivity of one statistics release: a row moves its unit-norm embedding (1) and one count (1)
STATISTICS_SENSITIVITY = math.sqrt(2.0)
# a head round's reply (client.head_rounds): its config's STAGE, and its one array, the noisy clipped
# head-gradient sum as a flat vector (common.head_gradient); no row count, no rank, no scale
HEAD_GRADIENT = "head-gradient"

# an empty train reply's config may say why it trained nothing (PLAN): STATISTICS_ONLY, the institution's
# plan trains nothing in any round after round 0 (client.recipe: no LoRA steps, no head rounds; its whole
# budget went to round 0's statistics), so a coordinator whose every institution says so stops the
# federation (server.app.end_if_nothing_trains); absent: no reason given
PLAN = "fedlora-plan"
STATISTICS_ONLY = "statistics-only"

# round 0 under secure aggregation (federation.secure_aggregation): the statistics message's stage of the
# protocol (common.secure_aggregation), one Grid exchange each, in this order
SECAGG_STAGE = "fedlora-secagg-stage"
ADVERTISE_KEYS = "advertise-keys"
SHARE_KEYS = "share-keys"
MASKED_INPUT = "masked-input"
CONSISTENCY = "consistency-check"
UNMASK = "unmask"
SECAGG_STAGES = (ADVERTISE_KEYS, SHARE_KEYS, MASKED_INPUT, CONSISTENCY, UNMASK)
# a head round under secure aggregation: the round's train message says the head rounds' gradients go
# through a secure sum (SECURE_HEAD); an institution that planned a head round answers it with a reply of
# stage JOIN_SECURE_SUM (nothing released, nothing charged); the five stages then run among those, each
# message's STAGE being HEAD_GRADIENT (the masked input: the head-gradient sum with a share of the noise)
SECURE_HEAD = "secure-head"
JOIN_SECURE_SUM = "join-secure-sum"
# server -> client (ConfigRecord): the round's context (random bytes binding every key and share to it),
# threshold, tolerated dropouts and colluders, and at the consistency check the survivors (node ids as str)
SECAGG_CONTEXT = "secagg-context"
SECAGG_THRESHOLD = "secagg-threshold"
SECAGG_DROPOUTS = "secagg-dropouts"
SECAGG_COLLUDERS = "secagg-colluders"
SECAGG_SURVIVORS = "secagg-survivors"
# the agreed noise (issue 28): each advert's config carries its institution's planned round-0 noise
# multiplier (SECAGG_NOISE; 0: no DP), and the share-keys stage carries every advertised one as a
# ConfigRecord (SECAGG_NOISES, node id as str -> multiplier); each institution adds a share of the largest
SECAGG_NOISE = "secagg-noise"
SECAGG_NOISES = "secagg-noises"
# server -> client (ArrayRecord, uint8): the roster's signed adverts ("<node>/cipher", "<node>/mask",
# "<node>/identity", "<node>/signature"), the shares sealed to the receiver by each sender ("<sender>"),
# and at the unmask stage the survivors' signatures over the survivor list ("<node>")
SECAGG_ROSTER = "secagg-roster"
SECAGG_INBOX = "secagg-inbox"
SECAGG_SIGNATURES = "secagg-signatures"
# client -> server (ArrayRecord): its public keys with its long-term identity and signature, its sealed
# shares by receiver, its masked vector (ring elements), its signature over the survivor list, or its
# unmasking shares ("seed/<node>", "key/<node>")
CIPHER_KEY = "cipher"
MASK_KEY = "mask"
IDENTITY = "identity"
SIGNATURE = "signature"
MASKED = "masked"
SEED_SHARE = "seed/"
KEY_SHARE = "key/"

# client -> server (MetricRecord): the keys below, checked by common.codec
NUM_EXAMPLES = "num-examples"
LOSS = "loss"
ACCURACY = "accuracy"
MACRO_F1 = "macro_f1"
RECALL = "recall_"  # + a class's label index: its recall (evaluate replies; the server averages by rows)
EPSILON = "epsilon"
LORA_R = "lora-r"
LORA_SCALE = "lora-scale"
STEPS = "steps"
TRAIN_SECONDS = "train-seconds"
# a statistics reply: the standard deviation of the Gaussian noise on its release (a function of the
# institution's budget alone, not of its data), which the server weighs the public start against
NOISE_STD = "noise-std"

# which metric keys a reply must carry, and which it may add (statistics an institution opts in to)
TRAIN_REQUIRED = (NUM_EXAMPLES, EPSILON, LORA_R, LORA_SCALE, STEPS, TRAIN_SECONDS)
TRAIN_OPTIONAL = (LOSS, NOISE_STD)
HEAD_REQUIRED = (EPSILON, STEPS, TRAIN_SECONDS, NOISE_STD)
EVALUATE_REQUIRED = (NUM_EXAMPLES,)
EVALUATE_OPTIONAL = (LOSS, ACCURACY, MACRO_F1)  # and RECALL keys, all with privacy.release_metrics
# tensor dtypes a reply may carry (Flower's Array.dtype names)
REPLY_DTYPES = ("float32", "float16")

# client -> server, a failed message: Error(code, reason) with only these fixed reasons, since an
# exception's own text can quote the institution's data (client.failures maps its errors to them)
FAILURES: dict[int, str] = {
    100: "internal error",
    101: "config error",
    102: "data error",
    103: "model error",
    104: "adapter error",
    105: "fingerprint mismatch",
    106: "budget exhausted",
    107: "training diverged",
    108: "ledger error",
}
# the code of a node whose privacy budget cannot pay for the round (the server tells it apart)
BUDGET_EXHAUSTED = 106

# node config (what only the institution decides) and run config
NODE_CONFIG = "config"
# the folder of the institution's worker (client.worker), set by its daemon; absent: each message is
# handled in the ClientApp's own process
NODE_WORKER = "worker"
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
RUN_DIR = "run-dir"

# fedlora's identity as a Flower App (pyproject.toml's [tool.flwr.app]): an institution runs a run's
# messages only when its app bundle names these (client.own_app), and then with its own installed code
APP_PUBLISHER = "fedlora"
APP_COMPONENTS = {"serverapp": "fedlora.server.app:app", "clientapp": "fedlora.client.relay:app"}
