"""Model compression (`tidemind lite`): calibration text (data.py), a model run layer by layer from
its checkpoint (layerwise.py, observers.py), AWQ W4A16 (awq.py) and SmoothQuant W8A8
(smooth_quant.py) over shared scale groups (groups.py) and quantizers (quantizer.py), and the
writer of the quantized checkpoint (export.py); pipeline.py runs the loop."""
