"""Triton Python-backend model: the reference LSTM(256)+Dense(64) step with per-sequence state.

Installed by setup.sh (which fills in the site-packages path below). The backend stub runs
the system Python in isolated mode (PYTHONPATH is ignored), so this file puts the peer
venv's site-packages on sys.path itself. Each request is one step (batch 1) of one
sequence; Triton's sequence batcher hands several sequences' steps to one `execute`, which
gathers their states, runs one XLA-compiled TF step over the batch (padded to a power of
two, like rnnserve's buckets) and keeps the new states in a dict keyed by CORRID. State
lives only in this process: it dies with the server.
"""

import os
import sys

SITE_PACKAGES = "@SITE_PACKAGES@"
if SITE_PACKAGES not in sys.path:
    sys.path.insert(0, SITE_PACKAGES)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

MAX_BATCH = 256


def _bucket(n):
    size = 1
    while size < n:
        size *= 2
    return size


class TritonPythonModel:
    def initialize(self, args):
        weights = np.load(os.path.join(os.path.dirname(__file__), "weights.npz"))
        self.units = int(weights["recurrent_kernel"].shape[0])
        self.states = {}
        import tensorflow as tf

        kernel, recurrent, bias, dense, dense_bias = (
            tf.constant(weights[name])
            for name in ("kernel", "recurrent_kernel", "bias", "dense_kernel", "dense_bias")
        )

        @tf.function(jit_compile=True)
        def step(x, h, c):
            z = tf.matmul(x, kernel) + tf.matmul(h, recurrent) + bias
            i, f, g, o = tf.split(z, 4, axis=1)
            c_t = tf.sigmoid(f) * c + tf.sigmoid(i) * tf.tanh(g)
            h_t = tf.sigmoid(o) * tf.tanh(c_t)
            return tf.matmul(h_t, dense) + dense_bias, h_t, c_t

        self.step = step
        features = int(weights["kernel"].shape[0])
        size = 1
        while size <= MAX_BATCH:  # compile every bucket before serving
            zeros = np.zeros((size, self.units), np.float32)
            step(np.zeros((size, features), np.float32), zeros, zeros)
            size *= 2

    def execute(self, requests):
        n = len(requests)
        size = _bucket(n)
        xs, hs, cs, ids, ends = [], np.zeros((size, self.units), np.float32), None, [], []
        cs = np.zeros((size, self.units), np.float32)
        for i, request in enumerate(requests):
            xs.append(pb_utils.get_input_tensor_by_name(request, "x").as_numpy().reshape(-1))
            corrid = int(
                pb_utils.get_input_tensor_by_name(request, "CORRID").as_numpy().reshape(-1)[0]
            )
            start = pb_utils.get_input_tensor_by_name(request, "START").as_numpy().reshape(-1)[0]
            end = pb_utils.get_input_tensor_by_name(request, "END").as_numpy().reshape(-1)[0]
            state = None if start else self.states.get(corrid)
            if state is not None:
                hs[i], cs[i] = state
            ids.append(corrid)
            ends.append(bool(end))
        x = np.zeros((size, xs[0].shape[0]), np.float32)
        x[:n] = xs
        y, h, c = (t.numpy() for t in self.step(x, hs, cs))
        responses = []
        for i, corrid in enumerate(ids):
            if ends[i]:
                self.states.pop(corrid, None)
            else:
                self.states[corrid] = (h[i], c[i])
            out = pb_utils.Tensor("y", y[i : i + 1])
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
        return responses

    def finalize(self):
        self.states.clear()
