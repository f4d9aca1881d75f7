"""Offline evaluation of MoE² on recorded answers: run folders, budget sweeps, online-stream replay,
and measurements of the paper's two assumptions."""
