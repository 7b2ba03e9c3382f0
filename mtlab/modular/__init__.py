"""Modular Transformers: modules that replace spans of teacher layers, trained once, assembled at any ratio."""
from .bank import ModuleBank, assemble, block_params, plan_stats, plan_table, stack_block_flops
from .plan import Plan, PlanError, enumerate_plans, size_first, speed_first, tilings, uniform
from .replacing import ReplacingConfig, train_modules

__all__ = ["ModuleBank", "assemble", "block_params", "plan_stats", "plan_table", "stack_block_flops", "Plan", "PlanError",
           "enumerate_plans", "size_first", "speed_first", "tilings", "uniform", "ReplacingConfig", "train_modules"]
