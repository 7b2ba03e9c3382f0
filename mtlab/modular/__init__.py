"""Modular Transformers: modules that replace spans of teacher layers, trained once, assembled at any ratio."""
from .bank import ModuleBank, assemble, block_params, plan_stats, plan_table, stack_block_flops, teacher_ladders
from .plan import (STRATEGIES, Plan, PlanError, assembly_strategy, enumerate_plans, ladders, register_screened, screened, size_first,
                   speed_first, strategies, tilings, uniform, unregister_strategy, using_screen)
from .replacing import PlanAwareConfig, PlanSampling, ReplacingConfig, train_modules

__all__ = ["ModuleBank", "assemble", "block_params", "plan_stats", "plan_table", "stack_block_flops", "Plan", "PlanError",
           "enumerate_plans", "size_first", "speed_first", "tilings", "uniform", "assembly_strategy", "strategies",
           "unregister_strategy", "ladders", "teacher_ladders", "ReplacingConfig", "train_modules", "PlanAwareConfig",
           "PlanSampling", "screened", "register_screened", "using_screen", "STRATEGIES"]
