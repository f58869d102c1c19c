// What the API handlers need from the daemon. Kept as an interface so the API has no
// knowledge of how the daemon wires things together.
import type { DriverRegistry } from '../core/driver.js';
import type { ImageService } from '../images/catalog.js';
import type { ResourceStore } from '../store/resources.js';
import type { TokenStore } from '../daemon/tokens.js';
import type { Ingress } from '../ingress/ingress.js';

export interface AuthInfo {
  tokenId: string;
  name: string;
  /** null = admin (all projects). */
  project: string | null;
}

export interface ApiContext {
  version: string;
  store: ResourceStore;
  drivers: DriverRegistry;
  images: ImageService;
  tokens: TokenStore;
  adminTokenPath: string;
  /** Where sandbox snapshots (templates) are kept. */
  templatesDir: string;
  /** Nudge a controller after an API write (the store's change feed also does this). */
  kick(kind: string, id: string): void;
  /** The ingress: reconcilers register route providers on it and call sync(). */
  ingress: Ingress;
}
