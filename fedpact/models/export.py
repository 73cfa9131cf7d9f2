"""Exported scoring models (TorchScript and ONNX) that carry the training encoding and calibration.

A delivered model (`model.pt`: state_dict, model kind, the job's public layout with declared
categories and numeric bounds) is exported as one function of the *raw* feature values, so every
row's score depends on that row alone and is the same in torch, libtorch or any ONNX runtime:

inputs
  `numeric`      float64 (rows, n_numeric): the numeric columns in layout order, raw values (no
                 NaN: apply the mapping's missing policy first, e.g. blank -> 0);
  `categorical`  int64 (rows, n_categorical): per categorical column, in layout order, the value's
                 position in that column's declared category list; -1 (or any other number) for a
                 value outside the list, which encodes as all indicators 0, as in training.
output
  `score`        float64 (rows,): the calibrated probability of the positive class.

Inside, exactly `FeaturePipeline.from_layout(layout)`: numbers clipped to their bounds [lo, hi] and
scaled to [-1, 1] as (x - (lo + hi) / 2) / ((hi - lo) / 2); one indicator per declared category;
the network; then sigmoid(a * logit + b) with the calibration fitted from the pooled held-out
histograms (`fedpact.models.scoring.fit_calibration`; a = 1, b = 0 without one). Everything runs
in float64 (the network's float32 weights widened), so a row's score does not even depend on the
batch size through float32 summation order (a few 1e-8 in float32), and torch and onnxruntime
agree to about 1e-15; against the float32 network of training the scores differ by < 1e-6.

The contract (`fedpact.json`: inputs, columns, categories, bounds, calibration), the layout and the
model card travel inside the file: TorchScript extra files, ONNX metadata properties. The ONNX
graph is written with the `onnx` helpers (Gather / Equal / Cast for the one-hot, Max / Min / Sub /
Div for the numbers, Gemm / Relu for the network, opset 17), so no exporter tracing is involved.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedpact.errors import FedpactError
from fedpact.models.networks import build_model
from fedpact.models.scoring import Calibration

EXPORT_FORMAT = "fedpact-scoring/1"
ONNX_OPSET = 17
ONNX_IR_VERSION = 8
_ZIP = b"PK\x03\x04"


class ExportError(FedpactError):
    """A model cannot be exported or an exported file cannot be loaded; the message says why."""


# --------------------------------------------------------------------------- the layout's encoding


def n_inputs(layout: dict) -> int:
    return sum(len(v) for v in layout["categorical"].values()) + len(layout["numeric"])


def check_layout(layout: dict, origin: str) -> None:
    """A layout the export can reproduce: every numeric column has declared bounds."""
    missing = [c for c in layout.get("numeric", []) if c not in (layout.get("bounds") or {})]
    if missing:
        raise ExportError(
            f"{origin}: the model's feature layout declares no bounds for {missing}: it was trained "
            "on numbers standardised with statistics of the rows, which no export can reproduce "
            "(a row's score would depend on the other rows); retrain it with a mapping that "
            "declares [bounds]")


def _encoding_arrays(layout: dict) -> dict[str, np.ndarray]:
    cats = layout["categorical"]
    numeric = list(layout["numeric"])
    lo = np.array([float(layout["bounds"][c][0]) for c in numeric], dtype=np.float64)
    hi = np.array([float(layout["bounds"][c][1]) for c in numeric], dtype=np.float64)
    return {
        "slot_column": np.array([j for j, values in enumerate(cats.values()) for _ in values], np.int64),
        "slot_code": np.array([k for values in cats.values() for k in range(len(values))], np.int64),
        "num_lo": lo, "num_hi": hi, "num_centre": (lo + hi) / 2, "num_half": (hi - lo) / 2,
    }


def input_contract(layout: dict, calibration: Calibration, model_kind: str) -> dict:
    """What the exported model takes and returns (stored in the file as `fedpact.json`)."""
    return {
        "format": EXPORT_FORMAT,
        "model": model_kind,
        "inputs": [
            {"name": "numeric", "dtype": "float64", "shape": ["rows", len(layout["numeric"])],
             "columns": list(layout["numeric"]),
             "bounds": {c: list(layout["bounds"][c]) for c in layout["numeric"]},
             "encoding": "raw values, no NaN (apply the mapping's missing policy first); the model "
                         "clips each to its bounds [lo, hi] and scales it to [-1, 1]"},
            {"name": "categorical", "dtype": "int64", "shape": ["rows", len(layout["categorical"])],
             "columns": list(layout["categorical"]),
             "categories": {c: list(v) for c, v in layout["categorical"].items()},
             "encoding": "position of the value in the column's declared category list (0-based); "
                         "-1 for any other value: all of that column's indicators are 0"},
        ],
        "output": {"name": "score", "dtype": "float64", "shape": ["rows"],
                   "meaning": "calibrated probability of the positive class, "
                              "sigmoid(a * logit + b)"},
        "calibration": calibration.to_dict(),
        "layout": layout,
    }


# --------------------------------------------------------------------------- TorchScript


class ScoringModule(nn.Module):
    """Raw numbers + category codes -> calibrated probability (TorchScript-able)."""

    def __init__(self, net: nn.Module, layout: dict, calibration: Calibration):
        super().__init__()
        self.net = net.double()  # float64 throughout: no score depends on the batch's size
        for name, value in _encoding_arrays(layout).items():
            self.register_buffer(name, torch.from_numpy(value))
        self.register_buffer("calibration", torch.tensor([calibration.a, calibration.b], dtype=torch.float64))

    def forward(self, numeric: torch.Tensor, categorical: torch.Tensor) -> torch.Tensor:
        codes = categorical.to(torch.long).index_select(1, self.slot_column)
        onehot = (codes == self.slot_code).to(torch.float64)
        x = torch.minimum(torch.maximum(numeric.to(torch.float64), self.num_lo), self.num_hi)
        scaled = (x - self.num_centre) / self.num_half
        logit = self.net(torch.cat([onehot, scaled], dim=1)).squeeze(-1)
        return torch.sigmoid(logit * self.calibration[0] + self.calibration[1])


def load_network(model_path: str | Path) -> tuple[nn.Module, str, dict]:
    """The delivered network (eval mode), its kind and its layout, from `model.pt`."""
    try:
        saved = torch.load(model_path, weights_only=False)
        kind, layout = saved["model"], saved["layout"]
    except (OSError, RuntimeError, KeyError, TypeError, ValueError) as exc:
        raise ExportError(f"{model_path}: not a fedpact model file ({exc})") from None
    net = build_model(kind, n_inputs(layout))
    net.load_state_dict(saved["state_dict"])
    return net.eval(), kind, layout


def export_torchscript(model_path: str | Path, out: str | Path, *, card: dict | None = None,
                       calibration: Calibration | None = None) -> dict:
    """Write the TorchScript scoring model (scripted, not traced); returns its contract."""
    net, kind, layout = load_network(model_path)
    check_layout(layout, str(model_path))
    calibration = calibration or Calibration()
    contract = input_contract(layout, calibration, kind)
    with warnings.catch_warnings():  # torch 2.13 marks TorchScript deprecated; torch and libtorch load it
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.script(ScoringModule(net, layout, calibration))
        torch.jit.save(module, str(out), _extra_files={
            "fedpact.json": json.dumps(contract), "layout.json": json.dumps(layout),
            "card.json": json.dumps(card or {})})
    return contract


# --------------------------------------------------------------------------- ONNX


def _layers(net: nn.Module) -> list[tuple[str, np.ndarray | None, np.ndarray | None]]:
    """("linear", W, b) / ("relu", None, None) for each layer of an eager or scripted Sequential."""
    out = []
    for child in net.children():
        name = getattr(child, "original_name", type(child).__name__)
        if name == "Linear":
            out.append(("linear", child.weight.detach().numpy().astype(np.float64),
                        child.bias.detach().numpy().astype(np.float64)))
        elif name == "ReLU":
            out.append(("relu", None, None))
        else:
            raise ExportError(f"cannot write a {name} layer to ONNX (only Linear and ReLU)")
    return out


def _onnx_model(layers, layout: dict, calibration: Calibration, metadata: dict[str, str]):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    arrays = _encoding_arrays(layout)
    inits, nodes = [], []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    n_num, n_cat = len(layout["numeric"]), len(layout["categorical"])
    blocks = []
    if len(arrays["slot_column"]):
        nodes += [helper.make_node("Gather", ["categorical", const("slot_column", arrays["slot_column"])],
                                   ["codes"], axis=1),
                  helper.make_node("Equal", ["codes", const("slot_code", arrays["slot_code"])], ["hit"]),
                  helper.make_node("Cast", ["hit"], ["onehot"], to=TensorProto.DOUBLE)]
        blocks.append("onehot")
    if n_num:
        nodes += [helper.make_node("Max", ["numeric", const("num_lo", arrays["num_lo"])], ["above_lo"]),
                  helper.make_node("Min", ["above_lo", const("num_hi", arrays["num_hi"])], ["clipped"]),
                  helper.make_node("Sub", ["clipped", const("num_centre", arrays["num_centre"])], ["centred"]),
                  helper.make_node("Div", ["centred", const("num_half", arrays["num_half"])], ["scaled"])]
        blocks.append("scaled")
    nodes.append(helper.make_node("Concat", blocks, ["features"], axis=1) if len(blocks) > 1
                 else helper.make_node("Identity", blocks, ["features"]))
    x = "features"
    for i, (kind, w, b) in enumerate(layers):
        if kind == "linear":
            nodes.append(helper.make_node("Gemm", [x, const(f"w{i}", w), const(f"b{i}", b)],
                                          [f"h{i}"], transB=1))
        else:
            nodes.append(helper.make_node("Relu", [x], [f"h{i}"]))
        x = f"h{i}"
    nodes += [helper.make_node("Squeeze", [x, const("axis1", np.array([1], np.int64))], ["logit"]),
              helper.make_node("Mul", ["logit", const("cal_a", np.array(calibration.a, np.float64))],
                               ["scaled_logit"]),
              helper.make_node("Add", ["scaled_logit", const("cal_b", np.array(calibration.b, np.float64))],
                               ["calibrated_logit"]),
              helper.make_node("Sigmoid", ["calibrated_logit"], ["score"])]
    graph = helper.make_graph(
        nodes, "fedpact_scoring",
        [helper.make_tensor_value_info("numeric", TensorProto.DOUBLE, ["rows", n_num]),
         helper.make_tensor_value_info("categorical", TensorProto.INT64, ["rows", n_cat])],
        [helper.make_tensor_value_info("score", TensorProto.DOUBLE, ["rows"])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
                              producer_name="fedpact", ir_version=ONNX_IR_VERSION,
                              doc_string="inputs: numeric float64 (rows, n) raw values in layout "
                                         "order; categorical int64 (rows, m) codes into the "
                                         "declared lists, -1 = other; output: score float64 (rows)")
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    return model


def _write_onnx(layers, layout: dict, calibration: Calibration, kind: str, card: dict | None,
                out: str | Path) -> dict:
    contract = input_contract(layout, calibration, kind)
    model = _onnx_model(layers, layout, calibration, {
        "fedpact.json": json.dumps(contract), "layout.json": json.dumps(layout),
        "card.json": json.dumps(card or {})})
    Path(out).write_bytes(model.SerializeToString())
    return contract


def export_onnx(model_path: str | Path, out: str | Path, *, card: dict | None = None,
                calibration: Calibration | None = None) -> dict:
    """Write the ONNX scoring model; returns its contract."""
    net, kind, layout = load_network(model_path)
    check_layout(layout, str(model_path))
    return _write_onnx(_layers(net), layout, calibration or Calibration(), kind, card, out)


def torchscript_to_onnx(ts_path: str | Path, out: str | Path) -> dict:
    """The ONNX model of a fedpact TorchScript export (same weights, layout, calibration, card)."""
    module, extra = _load_scripted(Path(ts_path))
    if not extra["fedpact.json"]:
        raise ExportError(f"{ts_path}: an export from before the embedded encoding; re-export it")
    contract = json.loads(extra["fedpact.json"])
    return _write_onnx(_layers(module.net), contract["layout"],
                       Calibration.from_dict(contract.get("calibration")), contract["model"],
                       json.loads(extra["card.json"] or "{}"), out)


# --------------------------------------------------------------------------- loading an export


@dataclass
class ExportedModel:
    """An exported model ready to score: `score(numeric, categorical)` -> float64 probabilities."""

    runtime: str
    layout: dict
    contract: dict
    label: str
    calibration: Calibration
    _predict: Any

    def score(self, numeric: np.ndarray, categorical: np.ndarray) -> np.ndarray:
        numeric = np.ascontiguousarray(numeric, dtype=np.float64)
        categorical = np.ascontiguousarray(categorical, dtype=np.int64)
        n_num, n_cat = len(self.layout["numeric"]), len(self.layout["categorical"])
        if numeric.ndim != 2 or numeric.shape[1] != n_num or categorical.ndim != 2 \
                or categorical.shape[1] != n_cat or len(numeric) != len(categorical):
            raise ExportError(f"{self.label}: expected numeric (rows, {n_num}) and categorical "
                              f"(rows, {n_cat}); got {numeric.shape} and {categorical.shape}")
        if len(numeric) == 0:
            return np.zeros(0, np.float64)
        return np.asarray(self._predict(numeric, categorical), dtype=np.float64).reshape(-1)


def _load_scripted(path: Path):
    extra = {"fedpact.json": "", "layout.json": "", "card.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            module = torch.jit.load(str(path), _extra_files=extra)
        except Exception as exc:  # torch raises RuntimeError / ValueError for foreign files
            raise ExportError(f"{path}: not a fedpact TorchScript export ({exc})") from None
    return module, extra


def _torch_predict(module):
    def predict(numeric: np.ndarray, categorical: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(numeric), torch.from_numpy(categorical)).numpy()
    return predict


def _legacy_predict(module, layout: dict):
    """Exports from before the embedded encoding take the encoded matrix: encode it here with the
    layout's public pipeline (never with statistics of the rows)."""
    from fedpact.models.features import FeaturePipeline

    pipe = FeaturePipeline.from_layout(layout)
    slots = _encoding_arrays(layout)

    def predict(numeric: np.ndarray, categorical: np.ndarray) -> np.ndarray:
        onehot = (categorical[:, slots["slot_column"]] == slots["slot_code"]).astype(np.float32)
        X = np.concatenate([onehot, pipe.scale_numbers(numeric)], axis=1)
        with torch.no_grad():
            return module(torch.from_numpy(X)).numpy()
    return predict


def load_exported(path: str | Path) -> ExportedModel:
    """A TorchScript or ONNX export of fedpact (told apart by the file's content)."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"model file {path} not found")
    with path.open("rb") as fh:
        head = fh.read(4)
    if head == _ZIP:
        module, extra = _load_scripted(path)
        card = json.loads(extra["card.json"] or "{}")
        label = card.get("model", path.name)
        if extra["fedpact.json"]:
            contract = json.loads(extra["fedpact.json"])
            return ExportedModel("torchscript", contract["layout"], contract, label,
                                 Calibration.from_dict(contract.get("calibration")), _torch_predict(module))
        if not extra["layout.json"]:
            raise ExportError(f"{path}: the export carries no layout (not a fedpact export?)")
        layout = json.loads(extra["layout.json"])
        check_layout(layout, str(path))
        contract = input_contract(layout, Calibration(), "legacy")
        return ExportedModel("torchscript", layout, contract, label, Calibration(),
                             _legacy_predict(module, layout))
    return _load_onnx(path)


def _load_onnx(path: Path) -> ExportedModel:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for foreign files
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ExportError(f"{path}: not a fedpact TorchScript export or ONNX model ({first})") from None
    meta = session.get_modelmeta().custom_metadata_map
    if "fedpact.json" not in meta:
        raise ExportError(f"{path}: an ONNX model without fedpact's contract (fedpact.json)")
    contract = json.loads(meta["fedpact.json"])
    card = json.loads(meta.get("card.json") or "{}")

    def predict(numeric: np.ndarray, categorical: np.ndarray) -> np.ndarray:
        return session.run(["score"], {"numeric": numeric, "categorical": categorical})[0]

    return ExportedModel("onnx", contract["layout"], contract, card.get("model", path.name),
                         Calibration.from_dict(contract.get("calibration")), predict)


__all__ = ["EXPORT_FORMAT", "ExportError", "ExportedModel", "ScoringModule", "check_layout",
           "export_onnx", "export_torchscript", "input_contract", "load_exported", "load_network",
           "n_inputs", "torchscript_to_onnx"]
