"""cocompile.runtime: run cocompile's ONNX artifacts with numpy and onnxruntime only (no torch).

>>> from cocompile.runtime import Session
>>> sess = Session("co_model.onnx")
>>> stream = sess.stream()                  # one stream, frame by frame
>>> y = stream.push(frame)                  # None until the first valid output
>>> streams = sess.streams(8)               # 8 streams, one batched call per step
>>> ys = streams.push(frames)               # frames: (8, *sess.frame_shape)
>>> streams.reset(3)                        # stream 3 starts over, the others carry on
"""
from .session import InputInfo, OutputInfo, Session
from .streams import Stream, Streams

__all__ = ["Session", "Stream", "Streams", "InputInfo", "OutputInfo"]
