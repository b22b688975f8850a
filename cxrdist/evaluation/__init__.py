"""Evaluation of trained models on a shard split (`cxrdist evaluate`)."""
