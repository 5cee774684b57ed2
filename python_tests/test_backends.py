"""The backend registry: one rule resolves every op's backend, and the status reports it per op."""
from __future__ import annotations

import warnings

import pytest
import torch

import ofdkern
from ofdkern import _backends
from ofdkern._backends import Backend, Op, resolve

from conftest import STATUS

PUBLIC_OPS = ["attention_transfer_loss", "channel_align_loss", "cwd_loss", "kd_loss", "ofd_loss"]
CPU = torch.device("cpu")


def test_every_public_op_is_registered():
    assert ofdkern.registered_ops() == PUBLIC_OPS


@pytest.mark.parametrize("op", PUBLIC_OPS)
def test_status_per_op(op):
    status = ofdkern.backend_status(op)
    assert list(status) == ["triton", "cuda", "cpu", "reference"]
    assert status["reference"]["devices"] == STATUS["reference"]["devices"]
    for name, entry in status.items():
        assert set(entry) == {"devices", "available", "reason", "kernels"}
        assert entry["available"] == bool(entry["devices"])
        # Runs somewhere, or says why not.
        assert entry["available"] or entry["reason"], (name, entry)
        assert set(entry["devices"]) <= set(STATUS[name]["devices"])
    assert status["cpu"]["available"] == STATUS["cpu"]["built"]
    assert (op in STATUS["cpu"]["runs"]) == status["cpu"]["available"]


def test_status_of_an_unknown_op_is_refused():
    with pytest.raises(ValueError, match="op must be one of"):
        ofdkern.backend_status("ofd")


def _probe_op(**backends) -> Op:
    return Op("probe_loss", backends)


def test_explicit_backend_runs_or_raises_naming_why_and_what_can():
    op = _probe_op(cpu=Backend(("ofdkern::not_an_op",)))
    with pytest.raises(ofdkern.BackendUnavailableError,
                       match=r"ofdkern.probe_loss: backend 'cpu' cannot run this call on cpu tensors: ofdkern._C has "
                             r"no cpu kernel for ofdkern::not_an_op .*Backends that can, here: \['reference'\]"):
        resolve(op, "cpu", CPU)
    with pytest.raises(ofdkern.BackendUnavailableError, match="probe_loss has no cuda kernel"):
        resolve(op, "cuda", CPU)
    assert resolve(op, "reference", CPU) == "reference"
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve(op, "gpu", CPU)


def test_auto_falls_back_to_the_reference_with_one_warning_per_op_and_device(monkeypatch):
    monkeypatch.setattr(_backends, "_warned_fallback", set())
    op = _probe_op(cpu=Backend(("ofdkern::not_an_op",)))
    with pytest.warns(RuntimeWarning, match=r"ofdkern.probe_loss: no fused kernel runs this call on cpu tensors"):
        assert resolve(op, "auto", CPU) == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve(op, "auto", CPU) == "reference"
        # Meta tensors: the reference's shape logic is what serves them, nothing to warn about.
        assert resolve(op, "auto", torch.device("meta")) == "reference"


def test_the_reference_runs_on_meta_tensors():
    s = torch.randn(2, 3, 4, 4, device="meta", requires_grad=True)
    loss = ofdkern.ofd_loss(s, s.detach(), torch.zeros(3, device="meta"), backend="reference")
    assert loss.device.type == "meta" and loss.shape == ()
    with pytest.raises(ofdkern.BackendUnavailableError, match=r"cannot run this call on meta tensors.*\['reference'\]"):
        ofdkern.ofd_loss(s, s.detach(), torch.zeros(3, device="meta"), backend="cpu")


def test_register_op_takes_fused_backends_only():
    with pytest.raises(ValueError, match="unknown backends"):
        _backends.register_op("probe_loss", reference=Backend())
