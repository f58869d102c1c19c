// The driver conformance suite against the runc driver: real runc + conmon, real cgroups.
import { conformanceOnHost } from '../conformance/host.js';
import { RuncDriver } from './driver.js';

conformanceOnHost('runc', ['/usr/sbin/runc'], 'runc', (stateDir, cgroupParent) => new RuncDriver({ stateDir, cgroupParent }));
