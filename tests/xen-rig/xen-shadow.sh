#!/bin/sh
# A copy of the rig's domU kept only from Castor's harvests (as the backup's image is)
# must equal what a checkpoint reads, at every 5th of 30 checkpoints (xen-selftest
# shadow): it fails when a frame changes behind Xen's dirty log and Castor does not know
# it (see docs/XEN.md, "Frames written behind the dirty log").
#   xen-shadow   no frame differs
. "$RIG_LIB"
xen-selftest shadow "$DOMU" 30
exit 0
