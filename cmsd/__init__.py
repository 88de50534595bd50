"""cmsd: confidence-modulated adaptive speculative decoding (CM-ASD) for Hugging Face models.

    from cmsd import load_pair, Decoder, DecodeSettings, PromptTemplate
    pair = load_pair("smollm2", drafter="ngram")
    gens = Decoder(pair, DecodeSettings(method="cmasd")).generate([PromptTemplate("summarization").render(pair.tokenizer, text)])

The decode-time library, by part:

    decode        the loop (Decoder): draft, verify, commit, adapt; the automatic verify budget
    verify        the verification rules: strict, CM-ASD's threshold, margin-aware, trees
    control       the controller: draft lengths k_j, the c_stop gate, thresholds tau_t from confidence
    confidence    C_ent, C_margin, C_soft and their ensemble C from a drafter's logits
    kv            the KV states a decode feeds and rolls back (HoleyState, SyncState)
    kernels       few-token linear layers and attention on CPU; the forward- and step-cost measurements
    tuning        a corpus's method and batch size chosen by measurement; the plans kept on disk
    settings      DecodeSettings and its sections;  stats: DocStats, the trace columns
    models        loading a target and its drafter (load_pair);  identity: a model's shape, fingerprint, cache dir
    prompts       the task prompts
    drafters/     the drafters: base (the interface, Draft, Sampler, DraftBuffer, the tree cut), ngram, model,
                  head (the feature head), selfspec (SpecBound's self-drafter)

Training (cmsd.train: the teacher data, the training loop, distilled drafters, feature heads, SpecBound's
calibration fit) is apart: nothing here imports it.
"""

from cmsd.decode import Decoder, Generation
from cmsd.identity import ModelError
from cmsd.models import DEFAULT_TARGET, LoadedModel, ModelPair, load_model, load_pair, smollm2_dir
from cmsd.prompts import PromptTemplate
from cmsd.settings import (METHODS, ConfidenceSettings, ControlSettings, DecodeSettings, HeadSettings,
                           MarginSettings, NgramSettings)
from cmsd.stats import TRACE_COLUMNS, DocStats

__all__ = ["DEFAULT_TARGET", "METHODS", "TRACE_COLUMNS", "ConfidenceSettings", "ControlSettings", "DecodeSettings",
           "Decoder", "DocStats", "Generation", "HeadSettings", "LoadedModel", "MarginSettings", "ModelError", "ModelPair",
           "NgramSettings", "PromptTemplate", "load_model", "load_pair", "smollm2_dir"]
