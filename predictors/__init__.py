"""Expert-routing predictors (what the next MoE layers will route to), their traces, training and
evaluation. Inference-time predictors are host-side numpy objects behind `predictors.base.Predictor`;
the learned one is trained with Flax + optax. May import `jaxmoe` (model, checkpoint); never `scheduler`.
"""
