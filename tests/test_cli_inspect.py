"""`inspect` says which base family a file fits when the file records none (from its module set or vector
width), and what the shipped toy erasers are."""

import glob
import os

import torch

from conceptgate.adapters import Eraser, ModuleDelta
from conceptgate.adapters.fingerprint import infer_base_family

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"


def _kv(width: int) -> Eraser:
    return Eraser("e", "weight", ["x"], modules={K: ModuleDelta(up=torch.zeros(320, 1), down=torch.zeros(1, width))})


def test_public_families_from_the_context_width():
    assert infer_base_family(_kv(768)) == (["sd1"], "module set")
    assert infer_base_family(_kv(1024)) == (["sd2"], "module set")
    assert infer_base_family(_kv(2048)) == ([], "module set")        # SDXL has no transformer at level 0
    xl = "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"
    e = Eraser("e", "weight", ["x"], modules={xl: ModuleDelta(up=torch.zeros(640, 1), down=torch.zeros(1, 2048))})
    assert infer_base_family(e) == (["sdxl"], "module set")
    attn1 = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    both = Eraser("e", "weight", ["x"], modules={attn1: ModuleDelta(up=torch.zeros(320, 1), down=torch.zeros(1, 320))})
    assert infer_base_family(both)[0] == ["sd1", "sd2"]                # nothing tells them apart
    geom = Eraser("g", "conditioning", ["w"], method="geom", tensors={"concept": torch.zeros(1, 768)})
    assert infer_base_family(geom) == (["sd1"], "vector width")
    assert infer_base_family(Eraser("a", "guidance", ["x"], method="abo")) == ([], "")


def test_inspect_names_the_toy_model_for_the_shipped_erasers(capsys):
    from conceptgate.cli import main

    files = sorted(glob.glob(os.path.join(ROOT, "toyworld", "erasers", "*.safetensors")))
    assert files
    assert main(["inspect", *files]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "base_family" in line]
    assert len(lines) == len(files)
    from conceptgate.adapters import load_eraser

    for path, line in zip(files, lines):  # a guidance eraser (All-but-One rule) holds no weights: any model
        expected = "any (a guidance rule" if load_eraser(path).kind == "guidance" else "toy (inferred from the"
        assert expected in line and "unknown" not in line, (path, line)
