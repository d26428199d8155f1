"""`--model` names of the neural families -> "module:Class" (imported lazily: torch only when used)."""

NEURAL_MODELS: dict[str, str] = {}
