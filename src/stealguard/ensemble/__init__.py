"""EDM: an ensemble of diverse models behind a secret perceptual hash.

Kariyappa, Prakash & Qureshi, "Protecting DNNs from Theft using an Ensemble of Diverse
Models", ICLR 2021. One file per part of the paper:

    diversity.py  coherence (eq. 1), diversity loss (eq. 2), the training loss (eq. 3)
    joint.py      the N members trained jointly as one vmapped computation (eq. 3)
    hash_net.py   hash_cnn3, the small 3-layer CNN f_H (registered as a model)
    hashing.py    DNN perceptual hash (sec. 4.2.1), DCT pHash and SHA-1, App. A.2 analysis
    predictor.py  EDMPredictor: one member per query, chosen by the hash (sec. 4.2)
    bundle.py     members + hash network + manifest on disk (the hash stays secret)
    pipeline.py   train_edm / train_hash_net and the KMNIST split
"""

from stealguard.ensemble import hash_net as _hash_net  # noqa: F401  (registers hash_cnn3)
from stealguard.ensemble.bundle import (
    EDMManifest,
    HashSpec,
    is_edm_bundle,
    load_edm,
    public_info,
    read_edm_manifest,
    read_hash_spec,
    save_edm,
)
from stealguard.ensemble.diversity import (
    coherence,
    coherence_cdf,
    diversity_loss,
    edm_loss,
    pairwise_cosine,
)
from stealguard.ensemble.hashing import (
    HASHES,
    DCTHash,
    DNNHash,
    ImageHash,
    SHA1Hash,
    random_perturbation,
    sorted_index_histogram,
)
from stealguard.ensemble.joint import EnsembleLog, MemberList, StackedMembers, train_ensemble
from stealguard.ensemble.pipeline import (
    EDMVictim,
    aux_sets,
    coherence_on,
    load_aux,
    load_edm_victim,
    save_edm_victim,
    split_halves,
    train_edm,
    train_hash_net,
)
from stealguard.ensemble.predictor import EDMPredictor

__all__ = [
    "HASHES", "DCTHash", "DNNHash", "EDMManifest", "EDMPredictor", "EDMVictim", "EnsembleLog",
    "HashSpec",
    "ImageHash", "MemberList", "SHA1Hash", "StackedMembers", "aux_sets", "coherence", "coherence_cdf",
    "coherence_on", "diversity_loss", "edm_loss", "is_edm_bundle", "load_aux", "load_edm",
    "load_edm_victim", "pairwise_cosine", "public_info", "random_perturbation",
    "read_edm_manifest", "read_hash_spec", "save_edm", "save_edm_victim", "sorted_index_histogram",
    "split_halves", "train_edm", "train_ensemble", "train_hash_net",
]
