# sourced by the drivers below: where the wheels were installed, unbuffered logs
export PYTHONPATH=/root/site:/root/site/nvidia_cutlass_dsl/dsl_packages PYTHONUNBUFFERED=1
R=runs/results/2026-12-01_h200_fused_ce
