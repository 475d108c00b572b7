"""What ``edge-tune eval`` measures, as steps the command (:mod:`edge_tune.commands.eval`) and
others share: the answer scorers (:mod:`.scores`), the held-out inputs (:mod:`.held_out`), a
tokenized example's log-likelihood and the greedy answer in llama.cpp (:mod:`.measure`), drift
on general prompts (:mod:`.drift`) and preference margins (:mod:`.preference`). Nothing here
imports a command."""
