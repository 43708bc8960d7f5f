#!/bin/sh
# Castor's Xen backend against the rig's running PVH domU (busybox sh, in dom0), through
# `xen-selftest` (bindings/xen/src/bin/xen-selftest.rs; built by ci's build_payload):
#   xen-info            what Castor sees of the domain (gfn space, populated frames)
#   xen-save-state      the state blob: HVM context, HVM params, TSC info
#   xen-running-changes running, the domU's memory changes (so the next check can fail)
#   xen-pause-stops     paused (xc_domain_pause), no frame changes for 2 s
#   xen-resume-runs     unpaused, frames change again
#   xen-logdirty-enable the first harvest after enabling log-dirty reports every frame
#   xen-dirty-log-roundN every frame that changed between two harvests (copies made
#                       through foreign mapping, compared) is in the harvested log
#   xen-domu-alive      the domU still counts afterwards
. "$RIG_LIB"
xen-selftest info "$DOMU"
xen-selftest save "$DOMU"
xen-selftest pause "$DOMU"
xen-selftest dirty "$DOMU" 3
c=$(rig_counter)
if rig_wait_counter $((c + 2)) 30; then
	rig_pass xen-domu-alive "counter $c -> $(rig_counter)"
else
	rig_fail xen-domu-alive "counter stuck at $(rig_counter) for 30 s"
fi
exit 0
