// The stack's S3: s3rver (objects as files under a folder, so a stopped stack restarts with
// every object) with what bridge relies on and s3rver lacks: conditional creation
// (`If-None-Match: *` on PUT: 412 when the key exists or another such PUT of it is in flight,
// atomic because Node checks and claims the key in one turn of its loop), and credentials from
// the environment (S3_ACCESS_KEY_ID / S3_SECRET_ACCESS_KEY; never on the command line, which
// `ps` shows) in place of s3rver's fixed S3RVER key.
// Usage: node server.js <directory> <port>   (listens on 127.0.0.1)
'use strict';

const S3rver = require('s3rver');
const Account = require('s3rver/lib/models/account');
const S3Error = require('s3rver/lib/models/error');

const [directory, port] = process.argv.slice(2);
const { S3_ACCESS_KEY_ID: accessKeyId, S3_SECRET_ACCESS_KEY: secretAccessKey } = process.env;
if (!directory || !port || !accessKeyId || !secretAccessKey) {
  console.error('usage: S3_ACCESS_KEY_ID=… S3_SECRET_ACCESS_KEY=… node server.js <directory> <port>');
  process.exit(2);
}
Account.DUMMY_ACCOUNT.revokeAccessKey('S3RVER');
Account.DUMMY_ACCOUNT.createKeyPair(accessKeyId, secretAccessKey);

const server = new S3rver({ directory, address: '127.0.0.1', port: Number(port), silent: true, vhostBuckets: false });
const claimed = new Set(); // bucket/key of conditional PUTs in flight

async function conditionalCreate(ctx, next) {
  const conditional = ctx.method === 'PUT' && ctx.get('if-none-match') === '*' && !ctx.query.uploadId;
  if (!conditional) return next();
  const [, bucket, ...rest] = ctx.path.split('/');
  const key = decodeURIComponent(rest.join('/'));
  const id = `${bucket}/${key}`;
  if (claimed.has(id)) throw new S3Error('PreconditionFailed', 'At least one of the pre-conditions you specified did not hold', { Condition: 'If-None-Match' });
  claimed.add(id);
  try {
    if (await ctx.store.existsObject(bucket, key)) {
      throw new S3Error('PreconditionFailed', 'At least one of the pre-conditions you specified did not hold', { Condition: 'If-None-Match' });
    }
    await next();
  } finally {
    claimed.delete(id);
  }
}

server.middleware.splice(server.middleware.length - 1, 0, conditionalCreate); // just before the routes
server.run().then(
  ({ address, port: listening }) => console.log(`s3rver on ${address}:${listening}, objects in ${directory}`),
  error => { console.error(error); process.exit(1); },
);
