"""kmsq chaos: fault injection with a recorded history and a checker."""
