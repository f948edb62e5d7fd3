"""Rollout service: samples rewarded responses for a shard of problems with a given checkpoint."""
