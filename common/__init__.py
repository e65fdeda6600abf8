"""What server and clients share: config, data, models, training loops."""
