"""The ServerApp: FedAvg rounds, server-side distillation and reporting."""
