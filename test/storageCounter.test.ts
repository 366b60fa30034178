// The benchmark's storage request counter: the Azure SDK clients work through it unchanged (SharedKey
// signatures survive the extra hop) and every request lands under the operation it is.
import assert from "node:assert/strict";
import { after, before, it } from "node:test";
import { QueueServiceClient } from "@azure/storage-queue";
import { TableClient, type TransactionAction } from "@azure/data-tables";
import { startAzurite, type Azurite } from "../cli/local/azurite.js";
import { classify, countBatchOperations, startStorageCounter, type StorageCounter } from "../bench/storageCounter.js";

let azurite: Azurite | undefined;
let counter: StorageCounter | undefined;

before(async () => {
  azurite = await startAzurite();
  counter = await startStorageCounter(azurite.ports);
});

after(async () => {
  await counter?.close();
  await azurite?.stop();
});

it("counts queue and table requests by operation while the SDK clients work through it", async () => {
  assert.ok(counter);
  const queues = QueueServiceClient.fromConnectionString(counter.connectionString).getQueueClient("counted");
  const table = TableClient.fromConnectionString(counter.connectionString, "counted", { allowInsecureConnection: true });
  await queues.create();
  await table.createTable();
  counter.reset();

  await queues.sendMessage("one");
  await queues.sendMessage("two");
  const { receivedMessageItems: received } = await queues.receiveMessages({ numberOfMessages: 2 });
  assert.equal(received.length, 2);
  const [first, second] = received;
  assert.ok(first && second);
  await queues.deleteMessage(first.messageId, first.popReceipt);
  await queues.updateMessage(second.messageId, second.popReceipt, "two, again", 0);

  const actions: TransactionAction[] = ["a", "b", "c"].map((rowKey) => ["upsert", { partitionKey: "p", rowKey, n: 1 }, "Merge"]);
  await table.submitTransaction(actions);
  assert.equal((await table.getEntity<{ n: number }>("p", "b")).n, 1);
  const rows = [];
  for await (const row of table.listEntities({ queryOptions: { filter: "PartitionKey eq 'p'" } })) rows.push(row);
  assert.equal(rows.length, 3);

  assert.deepEqual(counter.counts(), {
    "queue.delete": 1,
    "queue.put": 2,
    "queue.receive": 1,
    "queue.update": 1,
    "table.batch": 1,
    "table.batchOperations": 3,
    "table.pointRead": 1,
    "table.query": 1,
  });
  assert.equal(counter.total(), 8);
  assert.deepEqual(counter.failures(), {});

  // A refused request is still a request (and billed); it is also counted as a failure.
  await assert.rejects(table.getEntity("p", "missing"));
  assert.equal(counter.counts()["table.pointRead"], 2);
  assert.deepEqual(counter.failures(), { "table.pointRead": 1 });
});

it("tells the table writes apart by method and If-Match, and reads the rest of the REST surface", () => {
  const entity = "/devstoreaccount1/ledger(PartitionKey='p',RowKey='mid%3Aabc')";
  assert.equal(classify("table", "PUT", entity, {}), "insertOrReplace");
  assert.equal(classify("table", "PUT", entity, { "if-match": "*" }), "update");
  assert.equal(classify("table", "PATCH", entity, {}), "insertOrMerge");
  assert.equal(classify("table", "POST", entity, { "x-http-method": "MERGE", "if-match": 'W/"x"' }), "merge");
  assert.equal(classify("table", "DELETE", entity, { "if-match": "*" }), "delete");
  assert.equal(classify("table", "POST", "/devstoreaccount1/ledger", {}), "insert");
  assert.equal(classify("table", "GET", "/devstoreaccount1/ledger()?$filter=PartitionKey%20eq%20'p'", {}), "query");
  assert.equal(classify("table", "POST", "/devstoreaccount1/Tables", {}), "createTable");
  assert.equal(classify("queue", "GET", "/devstoreaccount1/q/messages?numofmessages=32&peekonly=true", {}), "peek");
  assert.equal(classify("queue", "DELETE", "/devstoreaccount1/q/messages", {}), "clear");
  assert.equal(classify("queue", "GET", "/devstoreaccount1/q?comp=metadata", {}), "getProperties");
  assert.equal(classify("queue", "PUT", "/devstoreaccount1/q", {}), "createQueue");
  assert.equal(classify("blob", "GET", "/devstoreaccount1/c/a/b.pdf", {}), "get");
  assert.equal(classify("blob", "PUT", "/devstoreaccount1/c/a.pdf?comp=lease", {}), "lease");
  assert.equal(classify("blob", "PUT", "/devstoreaccount1/c/a.pdf", {}), "put");
  assert.equal(countBatchOperations("--b\r\nContent-Type: application/http\r\n\r\nPATCH http://h/t(PartitionKey='a',RowKey='b') HTTP/1.1\r\nx: y\r\n"), 1);
});
