"""Calibration: read measured traces (nccl-tests, vTrain, Kineto) and fit the hardware model to them."""
