from __future__ import annotations

import pytest
import torch

from simclr_path.errors import SimclrPathError
from simclr_path.model import create_backbone, load_encoder, save_encoder


def test_encoder_roundtrip_gives_identical_features(tmp_path):
    torch.manual_seed(0)
    m = create_backbone("resnet18").eval()
    save_encoder(m, tmp_path / "encoder.pt", "resnet18", image_size=32)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m(x), load_encoder(tmp_path / "encoder.pt")(x))
        assert torch.equal(m(x), load_encoder(tmp_path)(x))


def test_local_weights_file_is_used(tmp_path):
    src = create_backbone("resnet18")
    torch.save(src.state_dict(), tmp_path / "w.pt")
    m = create_backbone("resnet18", weights=tmp_path / "w.pt")
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), m.state_dict().values()))


def test_unknown_arch_suggests_names():
    with pytest.raises(SimclrPathError, match="did you mean resnet18"):
        create_backbone("resnet181")


def test_corrupt_encoder_fails_clearly(tmp_path):
    (tmp_path / "encoder.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SimclrPathError, match="cannot read"):
        load_encoder(tmp_path / "encoder.pt", arch="resnet18")
