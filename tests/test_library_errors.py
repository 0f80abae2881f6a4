"""Errors from model libraries keep the useful part (issue 20.11): a timm/torchvision loading error names the first
missing and unexpected keys in one line, not torch's "Error(s) in loading state_dict for ResNet:" alone."""
from __future__ import annotations

import torch
from safetensors.torch import save_file

from weightspace.errors import library_message


def test_torchvision_load_error_names_the_keys():
    import torchvision
    net = torchvision.models.mobilenet_v2()
    sd = {"module." + k: v for k, v in net.state_dict().items()}  # a DataParallel save
    try:
        net.load_state_dict(sd)
    except RuntimeError as e:
        assert str(e).splitlines()[0] == "Error(s) in loading state_dict for MobileNetV2:"  # what was shown before
        msg = library_message(e)
    assert "\n" not in msg and msg.startswith("the weights do not fit MobileNetV2: missing ")
    assert "'features.0.0.weight'" in msg and "unexpected" in msg and "'module.features.0.0.weight'" in msg
    sd = net.state_dict()
    sd["features.0.0.weight"] = torch.zeros(32, 1, 3, 3)  # a grey stem
    try:
        net.load_state_dict(sd)
    except RuntimeError as e:
        assert library_message(e) == ("the weights do not fit MobileNetV2: 1 shape mismatch (e.g. "
                                      "'features.0.0.weight': checkpoint [32, 1, 3, 3], model [32, 3, 3, 3])")
    assert library_message(ValueError("no such file:\n  /x/y.bin\nmore")) == "no such file: /x/y.bin"  # not keys


def test_timm_source_with_a_misfit_file_is_one_line_naming_keys(tmp_path, cli):
    import timm
    sd = timm.create_model("resnet18", num_classes=10).state_dict()
    sd.pop("fc.bias")
    sd["extra.weight"] = torch.zeros(2)
    f = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(f))
    r = cli("inspect", f"timm:resnet18?file={f}")
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "missing 1 key (e.g. 'fc.bias'); unexpected 1 key (e.g. 'extra.weight')" in r.stderr
