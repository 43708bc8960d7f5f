/* The Xen tools headers Castor's bindings are generated from (Xen 4.17, libxen-dev). */
#include <xenctrl.h>
#include <xenforeignmemory.h>
#include <xenguest.h>
#include <xenstore.h>
