# As boot-1vcpu with two vCPUs: the guest must see both (it learns them from the firmware
# tables squib writes) and run its init on them.
. /rig/lib.sh
boot_cli 2
