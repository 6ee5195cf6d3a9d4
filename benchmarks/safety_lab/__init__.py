"""The safety lab: a real model, real harmful prompts, attack adapters and every repair's efficacy."""
