"""The benchmark: nomesh vs iptables vs eBPF on the test bed (`merbridge-py bench`).

stats (quantiles, paired ratios, noise) -> loads (tools and parsers) ->
measure (one run in pod namespaces and cgroups) -> runner (interleaved rounds)
-> results (summary, ratios, targets) -> schema / report / plots.
"""
