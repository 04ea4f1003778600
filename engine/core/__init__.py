"""The shared language every layer speaks: IR, errors, the communication model, memory residency and timing."""
