// The closed set of error classes Berth uses everywhere (API, CLI, drivers, store).
// One table maps each class to its HTTP status; nothing else in the code base picks
// status codes. Messages must say what to do about the error, not only what failed.

export const ERROR_CODES = {
  invalid_argument: 400,
  unauthenticated: 401,
  permission_denied: 403,
  not_found: 404,
  already_exists: 409,
  conflict: 409,
  failed_precondition: 412,
  unavailable: 503,
  internal: 500,
} as const;

export type ErrorCode = keyof typeof ERROR_CODES;

export class BerthError extends Error {
  readonly code: ErrorCode;
  readonly details?: Record<string, unknown>;
  constructor(code: ErrorCode, message: string, details?: Record<string, unknown>) {
    super(message);
    this.name = 'BerthError';
    this.code = code;
    if (details !== undefined) this.details = details;
  }
  get httpStatus(): number {
    return ERROR_CODES[this.code];
  }
  toJSON(): { error: { code: ErrorCode; message: string; details?: Record<string, unknown> } } {
    return { error: { code: this.code, message: this.message, ...(this.details ? { details: this.details } : {}) } };
  }
}

export const invalidArgument = (msg: string, details?: Record<string, unknown>) => new BerthError('invalid_argument', msg, details);
export const notFound = (msg: string) => new BerthError('not_found', msg);
export const alreadyExists = (msg: string) => new BerthError('already_exists', msg);
export const conflict = (msg: string) => new BerthError('conflict', msg);
export const failedPrecondition = (msg: string) => new BerthError('failed_precondition', msg);
export const unauthenticated = (msg: string) => new BerthError('unauthenticated', msg);
export const permissionDenied = (msg: string) => new BerthError('permission_denied', msg);
export const unavailable = (msg: string) => new BerthError('unavailable', msg);

/** Raised by a state machine when an operation is not allowed in the current phase. */
export class InvalidTransitionError extends BerthError {
  readonly from: string;
  readonly to: string;
  constructor(kind: string, from: string, to: string, hint: string) {
    super('failed_precondition', `${kind} cannot go from ${from} to ${to}: ${hint}`, { from, to });
    this.name = 'InvalidTransitionError';
    this.from = from;
    this.to = to;
  }
}

export function isBerthError(e: unknown): e is BerthError {
  return e instanceof BerthError;
}
