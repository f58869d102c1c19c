// The same driver conformance suite against the gVisor driver: real runsc + conmon, real cgroups.
import { conformanceOnHost } from '../conformance/host.js';
import { GvisorDriver, findRunsc } from './driver.js';

conformanceOnHost('gvisor', [findRunsc() ?? '/usr/local/lib/berth/runsc'], 'runsc', (stateDir, cgroupParent) => new GvisorDriver({ stateDir, cgroupParent }));
