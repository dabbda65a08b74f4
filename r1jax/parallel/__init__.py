"""Placing the model on a mesh: `rules` (the one logical-axis table), `mesh` (named data / expert
/ model meshes, multi-host start), `sharding` (PartitionSpecs and shardings of logical names),
`expert` (expert-parallel MoE dispatch) and `dryrun` (the pod-scale dry run's entry point)."""
