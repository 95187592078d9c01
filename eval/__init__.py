"""Evaluation: GenEval/DPG/GEdit/EditReward harnesses, reconstruction metrics, the Shapes suite."""
