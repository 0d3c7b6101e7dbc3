# Stock Linux boots under `squib run --backend kvm --kernel` with one vCPU and reaches its init,
# which then runs with clean state checks and a quiet kernel log.
. /rig/lib.sh
boot_cli 1
