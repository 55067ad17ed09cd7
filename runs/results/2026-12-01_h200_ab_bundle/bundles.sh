# sourced: the two bundles under test (issue #17). LOGIT_SOFTCAP_NEG is left out: PR #1923 learns its
# caps during TTT from 30, and no fixed value of ours has a source.
B1="SMEAR_GATE=1 SPARSE_ATTN_GATE=1 MUON_POLAR_EXPRESS=1 MIN_LR=0.1 MUON_WD_TAPER_AT=0.7 QK_GAIN_INIT=5.25 MATRIX_LR=0.028 EMA_SELECT=4"
# + progressive context (PR #2014), its 32-step ramp scaled to a 270-step run
B2="$B1 TRAIN_SEQ_SCHEDULE=1024@0.1,2048@0.7,3072@1 TRAIN_SEQ_LEN=3072 SEQ_CHANGE_WARMUP_STEPS=2"
