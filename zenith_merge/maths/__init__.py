"""The exact maths of the merge: pure functions of tensors and parameters, no file I/O.

graft (folding a donor expert through alignment maps), ridge (the closed-form fits), regmean (merging
linear layers from their input Gram matrices), routing (a family's top-k rule and the router spec it
reads from config.json), and mergekit-yaml's merge methods: methods (the table and `merge`),
task_arithmetic (task arithmetic, TIES, DARE, breadcrumbs, DELLA), interpolation (linear, SLERP,
NuSLERP, Model Stock, passthrough)."""
