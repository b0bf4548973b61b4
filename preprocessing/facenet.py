"""FaceNet Inception-ResNet-v1 in Keras 3, with weights read from facenet_keras.h5.

The architecture is written out here (it mirrors the Keras 2.1.2 model stored
in the h5, layer for layer and name for name); only the weights are read from
the file, by layer name, with shape checks. Importing this module imports
TensorFlow/Keras.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

import h5py
import keras
import numpy as np
import tensorflow as tf
from keras import layers

from .errors import ModelFileError
from .models import model_path

logger = logging.getLogger(__name__)

INPUT_SIZE = 160
EMBEDDING_DIM = 128
BATCH_SIZE = 32

# Residual scales of the Inception-ResNet blocks (from the h5's Lambda arguments).
BLOCK35_SCALE = 0.17
BLOCK17_SCALE = 0.10
BLOCK8_SCALE = 0.20
BN_EPSILON = 0.001
BN_MOMENTUM = 0.995


@keras.saving.register_keras_serializable(package="preprocessing")
class ScaleSum(layers.Layer):
    """inputs[0] + inputs[1] * scale: the residual sum of an Inception-ResNet block."""

    def __init__(self, scale: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.scale = float(scale)

    def call(self, inputs: list[Any]) -> Any:
        return inputs[0] + inputs[1] * self.scale

    def compute_output_shape(self, input_shape: list[tuple]) -> tuple:
        return input_shape[0]

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "scale": self.scale}


def _conv_bn(x: Any, filters: int, kernel: tuple[int, int], name: str, strides: int = 1,
             padding: str = "same", activation: bool = True) -> Any:
    """Conv2D (no bias) -> BatchNorm (no gamma) -> optional ReLU, named <name>, <name>_BatchNorm, <name>_Activation."""
    x = layers.Conv2D(filters, kernel, strides=strides, padding=padding, use_bias=False, name=name)(x)
    x = layers.BatchNormalization(axis=3, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, scale=False,
                                  name=f"{name}_BatchNorm")(x)
    if activation:
        x = layers.Activation("relu", name=f"{name}_Activation")(x)
    return x


def _residual(x: Any, branches: list[Any], prefix: str, scale: float, activation: bool) -> Any:
    mixed = layers.Concatenate(axis=3, name=f"{prefix}_Concatenate")(branches)
    up = layers.Conv2D(x.shape[-1], 1, padding="same", use_bias=True, name=f"{prefix}_Conv2d_1x1")(mixed)
    x = ScaleSum(scale, name=f"{prefix}_ScaleSum")([x, up])
    if activation:
        x = layers.Activation("relu", name=f"{prefix}_Activation")(x)
    return x


def _block35(x: Any, idx: int) -> Any:
    p = f"Block35_{idx}"
    b0 = _conv_bn(x, 32, (1, 1), f"{p}_Branch_0_Conv2d_1x1")
    b1 = _conv_bn(x, 32, (1, 1), f"{p}_Branch_1_Conv2d_0a_1x1")
    b1 = _conv_bn(b1, 32, (3, 3), f"{p}_Branch_1_Conv2d_0b_3x3")
    b2 = _conv_bn(x, 32, (1, 1), f"{p}_Branch_2_Conv2d_0a_1x1")
    b2 = _conv_bn(b2, 32, (3, 3), f"{p}_Branch_2_Conv2d_0b_3x3")
    b2 = _conv_bn(b2, 32, (3, 3), f"{p}_Branch_2_Conv2d_0c_3x3")
    return _residual(x, [b0, b1, b2], p, BLOCK35_SCALE, activation=True)


def _block17(x: Any, idx: int) -> Any:
    p = f"Block17_{idx}"
    b0 = _conv_bn(x, 128, (1, 1), f"{p}_Branch_0_Conv2d_1x1")
    b1 = _conv_bn(x, 128, (1, 1), f"{p}_Branch_1_Conv2d_0a_1x1")
    b1 = _conv_bn(b1, 128, (1, 7), f"{p}_Branch_1_Conv2d_0b_1x7")
    b1 = _conv_bn(b1, 128, (7, 1), f"{p}_Branch_1_Conv2d_0c_7x1")
    return _residual(x, [b0, b1], p, BLOCK17_SCALE, activation=True)


def _block8(x: Any, idx: int, scale: float = BLOCK8_SCALE, activation: bool = True) -> Any:
    p = f"Block8_{idx}"
    b0 = _conv_bn(x, 192, (1, 1), f"{p}_Branch_0_Conv2d_1x1")
    b1 = _conv_bn(x, 192, (1, 1), f"{p}_Branch_1_Conv2d_0a_1x1")
    b1 = _conv_bn(b1, 192, (1, 3), f"{p}_Branch_1_Conv2d_0b_1x3")
    b1 = _conv_bn(b1, 192, (3, 1), f"{p}_Branch_1_Conv2d_0c_3x1")
    return _residual(x, [b0, b1], p, scale, activation=activation)


def build_model() -> keras.Model:
    """Inception-ResNet-v1 (FaceNet) with random weights; layer names as in facenet_keras.h5.

    Input (None, 160, 160, 3) prewhitened RGB; output (None, 128) un-normalised.
    """
    inputs = keras.Input(shape=(INPUT_SIZE, INPUT_SIZE, 3), name="input_1")
    x = _conv_bn(inputs, 32, (3, 3), "Conv2d_1a_3x3", strides=2, padding="valid")
    x = _conv_bn(x, 32, (3, 3), "Conv2d_2a_3x3", padding="valid")
    x = _conv_bn(x, 64, (3, 3), "Conv2d_2b_3x3")
    x = layers.MaxPooling2D(3, strides=2, name="MaxPool_3a_3x3")(x)
    x = _conv_bn(x, 80, (1, 1), "Conv2d_3b_1x1", padding="valid")
    x = _conv_bn(x, 192, (3, 3), "Conv2d_4a_3x3", padding="valid")
    x = _conv_bn(x, 256, (3, 3), "Conv2d_4b_3x3", strides=2, padding="valid")

    for i in range(1, 6):
        x = _block35(x, i)

    # Mixed_6a (reduction A)
    b0 = _conv_bn(x, 384, (3, 3), "Mixed_6a_Branch_0_Conv2d_1a_3x3", strides=2, padding="valid")
    b1 = _conv_bn(x, 192, (1, 1), "Mixed_6a_Branch_1_Conv2d_0a_1x1")
    b1 = _conv_bn(b1, 192, (3, 3), "Mixed_6a_Branch_1_Conv2d_0b_3x3")
    b1 = _conv_bn(b1, 256, (3, 3), "Mixed_6a_Branch_1_Conv2d_1a_3x3", strides=2, padding="valid")
    b2 = layers.MaxPooling2D(3, strides=2, padding="valid", name="Mixed_6a_Branch_2_MaxPool_1a_3x3")(x)
    x = layers.Concatenate(axis=3, name="Mixed_6a")([b0, b1, b2])

    for i in range(1, 11):
        x = _block17(x, i)

    # Mixed_7a (reduction B)
    b0 = _conv_bn(x, 256, (1, 1), "Mixed_7a_Branch_0_Conv2d_0a_1x1")
    b0 = _conv_bn(b0, 384, (3, 3), "Mixed_7a_Branch_0_Conv2d_1a_3x3", strides=2, padding="valid")
    b1 = _conv_bn(x, 256, (1, 1), "Mixed_7a_Branch_1_Conv2d_0a_1x1")
    b1 = _conv_bn(b1, 256, (3, 3), "Mixed_7a_Branch_1_Conv2d_1a_3x3", strides=2, padding="valid")
    b2 = _conv_bn(x, 256, (1, 1), "Mixed_7a_Branch_2_Conv2d_0a_1x1")
    b2 = _conv_bn(b2, 256, (3, 3), "Mixed_7a_Branch_2_Conv2d_0b_3x3")
    b2 = _conv_bn(b2, 256, (3, 3), "Mixed_7a_Branch_2_Conv2d_1a_3x3", strides=2, padding="valid")
    b3 = layers.MaxPooling2D(3, strides=2, padding="valid", name="Mixed_7a_Branch_3_MaxPool_1a_3x3")(x)
    x = layers.Concatenate(axis=3, name="Mixed_7a")([b0, b1, b2, b3])

    for i in range(1, 6):
        x = _block8(x, i)
    x = _block8(x, 6, scale=1.0, activation=False)

    x = layers.GlobalAveragePooling2D(name="AvgPool")(x)
    x = layers.Dropout(0.2, name="Dropout")(x)
    x = layers.Dense(EMBEDDING_DIM, use_bias=False, name="Bottleneck")(x)
    x = layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, scale=False,
                                  name="Bottleneck_BatchNorm")(x)
    return keras.Model(inputs, x, name="inception_resnet_v1")


def _decode(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _weight_key(weight_name: str) -> str:
    """'Block35_1_Conv2d_1x1/bias:0' -> 'bias'."""
    return weight_name.split("/")[-1].split(":")[0]


def load_weights(model: keras.Model, path: str | Path) -> None:
    """Copy every weighted layer's weights from a Keras 2 h5 file into model, by layer name.

    Raises ModelFileError if a layer is missing on either side, a weight is
    missing or extra, or any shape differs.
    """
    path = Path(path)
    try:
        fh = h5py.File(path, "r")
    except OSError as exc:
        raise ModelFileError(f"{path}: cannot open as HDF5 ({exc})") from exc
    with fh:
        group = fh["model_weights"] if "model_weights" in fh else fh
        file_layers = {
            _decode(name) for name in group.attrs.get("layer_names", [])
            if len(group[_decode(name)].attrs.get("weight_names", [])) > 0
        }
        used: set[str] = set()
        for layer in model.layers:
            if not layer.weights:
                continue
            if layer.name not in file_layers:
                raise ModelFileError(f"{path}: layer {layer.name!r} has no weights in the file")
            layer_group = group[layer.name]
            stored = {}
            for wname in layer_group.attrs["weight_names"]:
                wname = _decode(wname)
                stored[_weight_key(wname)] = np.asarray(layer_group[wname])
            values = []
            for var in layer.weights:
                key = _weight_key(var.path)
                if key not in stored:
                    raise ModelFileError(
                        f"{path}: layer {layer.name!r} lacks weight {key!r} (file has {sorted(stored)})"
                    )
                value = stored.pop(key)
                if tuple(value.shape) != tuple(var.shape):
                    raise ModelFileError(
                        f"{path}: layer {layer.name!r} weight {key!r} has shape {value.shape}, "
                        f"expected {tuple(var.shape)}"
                    )
                values.append(value)
            if stored:
                raise ModelFileError(f"{path}: layer {layer.name!r} has unused weights {sorted(stored)} in the file")
            layer.set_weights(values)
            used.add(layer.name)
        unused = file_layers - used
        if unused:
            raise ModelFileError(f"{path}: weighted layers in the file not in the model: {sorted(unused)[:10]}")
    logger.debug("loaded weights of %d layers from %s", len(used), path)


_model_lock = threading.Lock()
_model: keras.Model | None = None
_forward: Any = None


def load_model() -> keras.Model:
    """The FaceNet model with facenet_keras.h5 weights (built once per process)."""
    global _model, _forward
    with _model_lock:
        if _model is None:
            path = model_path("facenet_keras")
            model = build_model()
            load_weights(model, path)
            _forward = tf.function(
                lambda x: model(x, training=False),
                input_signature=[tf.TensorSpec((None, INPUT_SIZE, INPUT_SIZE, 3), tf.float32)],
                reduce_retracing=True,
            )
            _model = model
            logger.info("FaceNet model built from %s", path)
        return _model


def prewhiten(crops: np.ndarray) -> np.ndarray:
    """Per-image standardisation: (x - mean) / max(std, 1/sqrt(x.size)), float32."""
    x = np.asarray(crops, dtype=np.float32)
    single = x.ndim == 3
    if single:
        x = x[None]
    axes = (1, 2, 3)
    mean = x.mean(axis=axes, keepdims=True)
    std = x.std(axis=axes, keepdims=True)
    size = np.prod(x.shape[1:])
    x = ((x - mean) / np.maximum(std, np.float32(1.0 / np.sqrt(size)))).astype(np.float32)
    return x[0] if single else x


def embed_crops(crops: np.ndarray | list[np.ndarray], batch_size: int = BATCH_SIZE) -> np.ndarray:
    """L2-normalised 128-d embeddings (n, 128) float32 of aligned 160x160 RGB uint8 crops."""
    arr = np.asarray(crops) if len(crops) else np.zeros((0, INPUT_SIZE, INPUT_SIZE, 3), np.uint8)
    if arr.ndim != 4 or arr.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
        raise ValueError(f"crops must be (n, {INPUT_SIZE}, {INPUT_SIZE}, 3) RGB, got shape {arr.shape}")
    if len(arr) == 0:
        return np.zeros((0, EMBEDDING_DIM), np.float32)
    load_model()
    out = []
    for start in range(0, len(arr), batch_size):
        batch = prewhiten(arr[start:start + batch_size])
        out.append(_forward(tf.constant(batch)).numpy())
    emb = np.concatenate(out).astype(np.float32)
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    return emb / np.maximum(norms, 1e-12)
