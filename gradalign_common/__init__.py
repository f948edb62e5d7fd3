"""What more than one GradAlign service needs: records, GRPO math, rewards, models, gRPC helpers."""
