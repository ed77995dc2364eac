"""The continual-learning suite (``nlplatform eval CHECKPOINT --suite continual``): ``domains.py`` (text domains one
after the other) and ``class_incremental.py`` over ``intents.py`` (intent classes one task after the other), scored by
``scores.py`` (average, forgetting, transfer), drawn by ``plots.py``; ``suite.py`` runs both protocols."""
