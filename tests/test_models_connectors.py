"""Connectors: [N, h*w, D_v] -> [N, k, D_lm] for every kind, any grid, with the right mixing."""

from __future__ import annotations

import pytest
import torch

import mm1.models  # noqa: F401  (fills the registries)
from mm1.config import ConnectorConfig
from mm1.models.connectors import build_connector
from mm1.models.registry import CONNECTORS
from mm1.registry import ConfigError

DV, DLM, GRID = 24, 32, 8


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_every_connector_kind_is_registered():
    assert set(CONNECTORS.names()) >= {"avgpool", "attnpool", "c_abstractor", "mlp"}


@pytest.mark.parametrize("kind", ["avgpool", "attnpool", "c_abstractor"])
@pytest.mark.parametrize("k", [16, 64])
@pytest.mark.parametrize("grid", [GRID, 12])  # 12: a higher-resolution (SFT) grid
def test_pooling_connectors_emit_k_tokens_at_any_grid_with_gradients(kind, k, grid):
    conn = build_connector(ConnectorConfig(kind=kind, num_tokens=k, heads=4), DV, DLM, GRID)
    x = torch.randn(2, grid * grid, DV, requires_grad=True)
    out = conn(x)
    assert out.shape == (2, k, DLM)
    out.square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in conn.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert all(p.grad.abs().sum() > 0 for p in conn.parameters())


@pytest.mark.parametrize("grid", [GRID, 4])
def test_mlp_connector_keeps_one_token_per_patch(grid):
    conn = build_connector(ConnectorConfig(kind="mlp", num_tokens=GRID * GRID), DV, DLM, GRID)
    out = conn(torch.randn(3, grid * grid, DV))
    assert out.shape == (3, grid * grid, DLM)
    assert [type(m).__name__ for m in conn.readout] == ["Linear", "GELU", "Linear"]  # LLaVA-1.5 mlp2x_gelu


def test_avgpool_pools_row_major_windows_of_the_grid():
    conn = build_connector(ConnectorConfig(kind="avgpool", num_tokens=16), DV, DLM, GRID)
    x = torch.randn(1, GRID * GRID, DV)
    y = x.clone()
    y[0, 1 * GRID + 6] += 1.0  # row 1, column 6 -> pooled window (0, 3) = token 3
    with torch.no_grad():
        changed = (conn(y) - conn(x)).abs().amax(-1)[0] > 1e-6
    assert changed.nonzero().flatten().tolist() == [3]


def test_c_abstractor_mixes_space_so_one_patch_moves_several_tokens():
    conn = build_connector(ConnectorConfig(kind="c_abstractor", num_tokens=16, depth=2), DV, DLM, GRID)
    x = torch.randn(1, GRID * GRID, DV)
    y = x.clone()
    y[0, 0] += 1.0
    with torch.no_grad():
        delta = (conn(y) - conn(x)).abs().amax(-1)[0]
    assert (delta > 1e-6).sum() > 1


def test_c_abstractor_position_embedding_separates_identical_patches():
    conn = build_connector(ConnectorConfig(kind="c_abstractor", num_tokens=16), DV, DLM, GRID)
    with torch.no_grad():
        conn.pos_embed.normal_()
        out = conn(torch.ones(1, GRID * GRID, DV))
    assert (out[0, 0] - out[0, 5]).abs().max() > 1e-4


def test_c_abstractor_hidden_dim_defaults_to_the_vision_width():
    assert build_connector(ConnectorConfig(kind="c_abstractor"), DV, DLM, GRID).stage2[0].conv3[0].out_channels == DV
    conn = build_connector(ConnectorConfig(kind="c_abstractor", hidden_dim=40), DV, DLM, GRID)
    assert conn.stage2[0].conv3[0].out_channels == 40
    assert conn(torch.randn(1, 64, DV)).shape == (1, 16, DLM)


def test_attnpool_ignores_patch_order_because_positions_come_from_the_encoder():
    conn = build_connector(ConnectorConfig(kind="attnpool", num_tokens=16, heads=4), DV, DLM, GRID)
    x = torch.randn(2, GRID * GRID, DV)
    with torch.no_grad():
        torch.testing.assert_close(conn(x[:, torch.randperm(GRID * GRID)]), conn(x), rtol=1e-5, atol=1e-5)


def test_non_square_inputs_need_their_grid():
    conn = build_connector(ConnectorConfig(kind="avgpool", num_tokens=16), DV, DLM, GRID)
    assert conn(torch.randn(1, 6 * 10, DV), grid=(6, 10)).shape == (1, 16, DLM)
    with pytest.raises(ValueError, match="pass grid"):
        conn(torch.randn(1, 60, DV))


def test_pooled_token_count_must_be_a_perfect_square():
    with pytest.raises(ConfigError, match="perfect square"):
        build_connector(ConnectorConfig(kind="c_abstractor", num_tokens=20), DV, DLM, GRID)


@pytest.mark.parametrize("kind", ["avgpool", "attnpool", "c_abstractor", "mlp"])
def test_connectors_build_on_the_meta_device(kind):
    with torch.device("meta"):
        conn = build_connector(ConnectorConfig(kind=kind, num_tokens=64 if kind == "mlp" else 16), DV, DLM, GRID)
    assert all(p.is_meta for p in conn.parameters())
    conn.to_empty(device="cpu")  # how FSDP / a trainer materialises a meta model
    conn.reset_parameters()
    out = conn(torch.randn(2, 64, DV))
    assert torch.isfinite(out).all() and out.std() > 0


def test_c_abstractor_checkpoint_from_a_lower_resolution_loads_with_regridded_positions():
    low = build_connector(ConnectorConfig(kind="c_abstractor", num_tokens=16), DV, DLM, GRID).eval()
    high = build_connector(ConnectorConfig(kind="c_abstractor", num_tokens=16), DV, DLM, 12).eval()
    high.load_state_dict(low.state_dict())  # SFT: the encoder grid grew from 8x8 to 12x12
    assert high.pos_embed.shape == (1, 144, DV)
    x = torch.randn(2, 144, DV)
    with torch.no_grad():
        torch.testing.assert_close(high(x), low(x), rtol=1e-5, atol=1e-5)
