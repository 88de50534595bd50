"""cmsd: confidence-modulated adaptive speculative decoding (CM-ASD) for Hugging Face models.

    from cmsd import load_pair, Decoder, DecodeSettings, PromptTemplate
    pair = load_pair("smollm2", drafter="ngram")
    gens = Decoder(pair, DecodeSettings(method="cmasd")).generate([PromptTemplate("summarization").render(pair.tokenizer, text)])
"""

from cmsd.decode import Decoder, Generation
from cmsd.models import DEFAULT_TARGET, LoadedModel, ModelError, ModelPair, load_model, load_pair, smollm2_dir
from cmsd.prompts import PromptTemplate
from cmsd.settings import (METHODS, ConfidenceSettings, ControlSettings, DecodeSettings, HeadSettings,
                           MarginSettings, NgramSettings)
from cmsd.stats import TRACE_COLUMNS, DocStats

__all__ = ["DEFAULT_TARGET", "METHODS", "TRACE_COLUMNS", "ConfidenceSettings", "ControlSettings", "DecodeSettings",
           "Decoder", "DocStats", "Generation", "HeadSettings", "LoadedModel", "MarginSettings", "ModelError", "ModelPair",
           "NgramSettings", "PromptTemplate", "load_model", "load_pair", "smollm2_dir"]
