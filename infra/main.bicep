// queue-mailer on Azure Functions Flex Consumption (Node.js 22), with no shared keys anywhere:
// one user-assigned managed identity reaches storage (host and app), Key Vault, Application
// Insights and the deployment package.
//
//   az deployment group create -g <rg> -f infra/main.bicep -p infra/main.parameters.json \
//     -p appClientId=<application (client) id> smtpUser=<mailbox> [operatorPrincipalId=<your object id>]
//
// The template does not cover the steps that Azure Resource Manager cannot perform: the app
// registration, the certificate in Key Vault, SMTP.SendAsApp consent and the Exchange service
// principal (authMethod refresh-token: the user's one sign-in with `queue-mailer authorize`).
// docs/deploy-azure.md walks through them.
//
// test/infra.test.ts checks this file against shared/config.ts (settingSpecs), host.json and
// the table and queue names in the code. When a setting is added there, add it below, either as
// an app setting or in one of the "Settings not set here" lists.

targetScope = 'resourceGroup'

// ---------------------------------------------------------------------------------------------
// Parameters
// ---------------------------------------------------------------------------------------------

@description('Short name used to build resource names: lower-case letters and digits, at most 9.')
@minLength(3)
@maxLength(9)
param baseName string = 'qmail'

@description('Region for all resources. It must offer Flex Consumption.')
param location string = resourceGroup().location

@description('Tags for all resources.')
param tags object = {}

@description('TENANT_ID: directory of the app registration that holds SMTP.SendAsApp (normally this subscription\'s tenant).')
param tenantId string = tenant().tenantId

@description('AUTH_METHOD: how the app signs in (docs/auth-*.md). "certificate" (client assertion, the certificate in this vault), "secret" (client secret, from the vault secret clientSecretName), "google-service-account" (JSON key, from the vault secret googleKeySecretName), "password" (legacy password grant, from the vault secret mailboxPasswordSecretName), "refresh-token" (delegated: a user signs in once with `queue-mailer authorize`, which writes the refresh token to the vault secret refreshTokenSecretName; docs/auth-refresh-token.md).')
@allowed([
  'certificate'
  'secret'
  'google-service-account'
  'password'
  'refresh-token'
])
param authMethod string = 'certificate'

@description('TRANSPORT: "smtp" (Exchange SMTP submission, 30 messages a minute per mailbox) or "graph" (Microsoft Graph sendMail: grant the app Mail.Send instead of SMTP.SendAsApp; see docs/transport-graph.md).')
@allowed([
  'smtp'
  'graph'
])
param transport string = 'smtp'

@description('CLIENT_ID: Application (client) ID of the app registration (every method but google-service-account).')
@maxLength(36)
param appClientId string = ''

@description('SMTP_USER: the mailbox the app signs in as and sends from.')
param smtpUser string

@description('MAIL_FROM: default From address. Empty means SMTP_USER.')
param mailFrom string = ''

@description('CERT_NAME: name of the certificate in the Key Vault this template creates (create it afterwards, see docs/deploy-azure.md).')
param certificateName string = 'smtp-sender'

@description('CERT_SIGNING, for authMethod certificate. "export" (CERT_SIGNING=local): reads the certificate with its private key (Key Vault Certificate User). "remote" (CERT_SIGNING=vault): the key stays in the vault, which signs each assertion (Key Vault Crypto User; Key Vault Reader reads the public certificate), so the key may be non-exportable.')
@allowed([
  'export'
  'remote'
])
param signingMode string = 'export'

@description('CLIENT_SECRET_NAME: name of the vault secret holding the client secret (authMethod secret; optional for password). Empty: none.')
param clientSecretName string = ''

@description('GOOGLE_KEY_NAME: name of the vault secret holding the service account\'s JSON key (authMethod google-service-account).')
param googleKeySecretName string = ''

@description('MAILBOX_PASSWORD_NAME: name of the vault secret holding the mailbox password (authMethod password).')
param mailboxPasswordSecretName string = ''

@description('REFRESH_TOKEN_NAME: name of the vault secret holding the signed-in user\'s refresh token (authMethod refresh-token). `queue-mailer authorize` creates it and the app writes a new version at every rotation, so the app identity (and operatorPrincipalId) get Key Vault Secrets Officer on the vault.')
param refreshTokenSecretName string = ''

@description('MAIL_QUEUE: the queue applications drop messages on. The poison queue is "<name>-poison", so at most 56 characters.')
@minLength(3)
@maxLength(56)
param mailQueue string = 'outbound-email'

@description('ATTACHMENT_CONTAINER: blob container for claim-check messages and attachments sent by reference.')
@minLength(3)
@maxLength(63)
param attachmentContainer string = 'mail-attachments'

@description('ALLOWED_RECIPIENT_DOMAINS: staging sandbox, a comma list of domains. Empty means no restriction.')
param allowedRecipientDomains string = ''

@description('EXPIRY_CHECK_SCHEDULE: six-field NCRONTAB, UTC.')
param expiryCheckSchedule string = '0 0 7 * * *'

@description('EXPIRY_WARN_DAYS: days before expiry at which to warn.')
param expiryWarnDays string = '30,14,7,3,1'

@description('EXPIRY_CRITICAL_DAYS: within this many days an item alerts daily.')
@minValue(0)
param expiryCriticalDays int = 7

@description('EXPIRY_WATCH_NAMES: Key Vault items to watch (names or prefixes ending in *). Empty means everything in the vault.')
param expiryWatchNames string = ''

@description('EXPIRY_CHECK_APP_REGISTRATION: also read the app registration\'s credentials through Microsoft Graph. The managed identity then needs the Graph application permission Application.Read.All (docs/deploy-azure.md).')
@allowed([
  'true'
  'false'
])
param expiryCheckAppRegistration string = 'false'

@description('EXPIRY_ALERT_TO: alert email recipients (comma list), sent through the mail queue. Empty means no email alerts.')
param expiryAlertTo string = ''

@description('Name of a secret in the Key Vault that holds the incoming webhook URL for EXPIRY_WEBHOOK_URL (Teams or Slack). The app setting becomes a Key Vault reference. Empty means no webhook.')
param expiryWebhookSecretName string = ''

@description('Email address for the Azure Monitor alerts (expiry warnings, poisoned messages, sending paused). Empty means the alert rules fire without notifying anyone.')
param alertEmail string = ''

@description('Upper bound of instances per function. The Exchange limits are per mailbox and hold across instances (Table storage), so more instances do not send faster. See docs/scaling.md.')
@minValue(1)
@maxValue(1000)
param maximumInstanceCount int = 2

@description('Always-ready instances for the queue function. 0 lets the app scale to zero (a cold start of a few seconds for the first message); 1 keeps one instance warm and billed.')
@minValue(0)
param alwaysReadyInstances int = 0

@description('Flex Consumption instance memory.')
@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int = 2048

@description('Object ID of a person or group who operates the mailer: creates and renews the certificate (Key Vault Certificates Officer), runs `queue-mailer expiry` (Key Vault Reader), and runs `queue-mailer enqueue` and `poison` (Storage Queue Data Contributor, Storage Blob Data Contributor). Empty means no such role assignments.')
param operatorPrincipalId string = ''

@description('Type of operatorPrincipalId.')
@allowed([
  'User'
  'Group'
  'ServicePrincipal'
])
param operatorPrincipalType string = 'User'

@description('More app settings, merged last (for example {"SMTP_MAX_CONNECTIONS": "2"}). A redeploy replaces the whole set of app settings, so change settings here rather than in the portal.')
param extraAppSettings object = {}

@description('Log Analytics retention in days.')
@minValue(30)
@maxValue(730)
param logRetentionDays int = 30

@description('Key Vault purge protection. Once on, it cannot be turned off, and a deleted vault keeps its name for the retention period.')
param enablePurgeProtection bool = true

// ---------------------------------------------------------------------------------------------
// Names
// ---------------------------------------------------------------------------------------------

var resourceToken = toLower(uniqueString(subscription().id, resourceGroup().id, baseName))
var prefix = toLower(baseName)
var storageAccountName = take('st${prefix}${resourceToken}', 24)
var keyVaultName = take('kv-${prefix}-${resourceToken}', 24)
var functionAppName = 'func-${prefix}-${resourceToken}'
var planName = 'plan-${prefix}-${resourceToken}'
var identityName = 'id-${prefix}-${resourceToken}'
var workspaceName = 'log-${prefix}-${resourceToken}'
var appInsightsName = 'appi-${prefix}-${resourceToken}'

var poisonQueue = '${mailQueue}-poison'
// Keeps warm instances for the queue function only (per-function scale group "function:<name>").
var alwaysReady = alwaysReadyInstances > 0 ? [{ name: 'function:sendEmail', instanceCount: alwaysReadyInstances }] : []
// The Flex Consumption deployment package lives in this container of the same storage account.
var deploymentContainer = 'app-package'
// Tables the code opens: expiryalerts (shared/expiry/alertLedger.ts ALERT_TABLE), sendledger
// (shared/send/sendLedger.ts SEND_LEDGER_TABLE), sendrate (shared/send/rateLimiter.ts RATE_TABLE),
// smtpconnections (shared/send/connectionSlots.ts CONNECTION_TABLE), deliveryevents
// (shared/events/deliveryEvents.ts DELIVERY_EVENTS_TABLE), refreshtokenlease
// (shared/auth/refreshTokenLease.ts REFRESH_TOKEN_LEASE_TABLE), suppressions
// (shared/bounces/suppressionList.ts SUPPRESSIONS_TABLE), bouncewatch (shared/bounces/bounceWatchState.ts
// BOUNCE_WATCH_TABLE: the bounce watch's lease and checkpoint). The code creates them if
// they are missing; creating them here makes the account complete before the first message.
var appTables = [
  'bouncewatch'
  'dailyrecipients'
  'deliveryevents'
  'expiryalerts'
  'mailboxpause'
  'refreshtokenlease'
  'sendledger'
  'sendrate'
  'smtpconnections'
  'suppressions'
]

// Built-in role definition IDs (same in every Azure cloud).
var roles = {
  storageBlobDataOwner: 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b'
  storageBlobDataContributor: 'ba92f5b4-2d11-453d-a403-e96b0029c9fe'
  storageQueueDataContributor: '974c5e8b-45b9-4653-ba55-5f855dd0fb88'
  storageTableDataContributor: '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3'
  keyVaultCertificateUser: 'db79e9a7-68ee-4b58-9aeb-b90e7c24fcba'
  keyVaultCertificatesOfficer: 'a4417e6f-fecd-4de8-b567-7b0420556985'
  keyVaultSecretsUser: '4633458b-17de-408a-b874-0445c86b69e6'
  keyVaultSecretsOfficer: 'b86a8fe4-44ce-4948-aee5-eccb2c155cd7'
  keyVaultCryptoUser: '12338af0-0e69-4776-bea7-57ae8d297424'
  keyVaultReader: '21090545-7ca7-4776-b22c-e363652d74d2'
  monitoringMetricsPublisher: '3913510d-42f4-4e42-8a64-420c390055eb'
}

// ---------------------------------------------------------------------------------------------
// Identity
// ---------------------------------------------------------------------------------------------

resource identity 'Microsoft.ManagedIdentity/userAssignedIdentities@2023-01-31' = {
  name: identityName
  location: location
  tags: tags
}

// ---------------------------------------------------------------------------------------------
// Storage: host storage, mail queue, tables, attachments and the deployment package
// ---------------------------------------------------------------------------------------------

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  name: storageAccountName
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: {
    name: 'Standard_LRS'
  }
  properties: {
    accessTier: 'Hot'
    allowSharedKeyAccess: false
    defaultToOAuthAuthentication: true
    allowBlobPublicAccess: false
    allowCrossTenantReplication: false
    minimumTlsVersion: 'TLS1_2'
    supportsHttpsTrafficOnly: true
    publicNetworkAccess: 'Enabled'
  }
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: storage
  name: 'default'
}

resource deploymentPackageContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: deploymentContainer
  properties: {
    publicAccess: 'None'
  }
}

resource attachmentsContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: attachmentContainer
  properties: {
    publicAccess: 'None'
  }
}

resource queueService 'Microsoft.Storage/storageAccounts/queueServices@2023-05-01' = {
  parent: storage
  name: 'default'
}

resource queues 'Microsoft.Storage/storageAccounts/queueServices/queues@2023-05-01' = [
  for queueName in [mailQueue, poisonQueue]: {
    parent: queueService
    name: queueName
  }
]

resource tableService 'Microsoft.Storage/storageAccounts/tableServices@2023-05-01' = {
  parent: storage
  name: 'default'
}

resource tables 'Microsoft.Storage/storageAccounts/tableServices/tables@2023-05-01' = [
  for tableName in appTables: {
    parent: tableService
    name: tableName
  }
]

// The host needs Blob Data Owner for its own blobs (leases, keys) and the Flex deployment package.
// Owner also covers the attachments container. Queue Data Contributor covers the trigger, the
// poison queue and the requeue of waiting messages. Table Data Contributor covers the ledger,
// rate and connection slots, and the expiry alert state.
resource appStorageRoles 'Microsoft.Authorization/roleAssignments@2022-04-01' = [
  for role in [roles.storageBlobDataOwner, roles.storageQueueDataContributor, roles.storageTableDataContributor]: {
    name: guid(storage.id, identity.id, role)
    scope: storage
    properties: {
      roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', role)
      principalId: identity.properties.principalId
      principalType: 'ServicePrincipal'
    }
  }
]

// ---------------------------------------------------------------------------------------------
// Key Vault (RBAC mode) for the signing certificate
// ---------------------------------------------------------------------------------------------

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  name: keyVaultName
  location: location
  tags: tags
  properties: {
    tenantId: subscription().tenantId
    sku: {
      family: 'A'
      name: 'standard'
    }
    enableRbacAuthorization: true
    enableSoftDelete: true
    softDeleteRetentionInDays: 90
    enablePurgeProtection: enablePurgeProtection ? true : null
    publicNetworkAccess: 'Enabled'
  }
}

// Each mode gets the one role it needs:
// certificate, export: Certificate User reads the certificate with its private key (getSecret
//         under the certificate's name). It can read every secret in this vault, so keep the
//         vault for this app.
// certificate, remote: Crypto User signs with the key; Reader reads the public certificate.
// secret, google-service-account, password: Secrets User reads the credential's secret.
// refresh-token: Secrets Officer (appRefreshTokenWriter below), which reads and also writes:
//         every rotation is a new version of the secret (Secrets User can only read). At vault
//         scope: the secret does not exist until `queue-mailer authorize` runs, and a role
//         assignment needs an existing scope.
// Always:  Reader is enough for the expiry watch, which lists certificates and secrets without
//          reading their values.
// Webhook: Secrets User resolves the EXPIRY_WEBHOOK_URL Key Vault reference.
var usesCertificate = authMethod == 'certificate'
var credentialSecretNames = filter([clientSecretName, googleKeySecretName, mailboxPasswordSecretName], name => !empty(name))
var writesRefreshToken = authMethod == 'refresh-token' && !empty(refreshTokenSecretName)
var appVaultSigningRoles = !usesCertificate ? [] : signingMode == 'export' ? [roles.keyVaultCertificateUser] : [roles.keyVaultCryptoUser]
var appVaultSecretRoles = empty(expiryWebhookSecretName) && empty(credentialSecretNames) ? [] : [roles.keyVaultSecretsUser]
var appVaultRoles = concat(appVaultSigningRoles, [roles.keyVaultReader], appVaultSecretRoles)

resource appVaultRoleAssignments 'Microsoft.Authorization/roleAssignments@2022-04-01' = [
  for role in appVaultRoles: {
    name: guid(vault.id, identity.id, role)
    scope: vault
    properties: {
      roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', role)
      principalId: identity.properties.principalId
      principalType: 'ServicePrincipal'
    }
  }
]

resource appRefreshTokenWriter 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (writesRefreshToken) {
  name: guid(vault.id, identity.id, roles.keyVaultSecretsOfficer)
  scope: vault
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.keyVaultSecretsOfficer)
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

// The operator runs `queue-mailer authorize`, which writes the first version of the refresh token.
resource operatorRefreshTokenWriter 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (writesRefreshToken && !empty(operatorPrincipalId)) {
  name: guid(vault.id, operatorPrincipalId, roles.keyVaultSecretsOfficer)
  scope: vault
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.keyVaultSecretsOfficer)
    principalId: operatorPrincipalId
    principalType: operatorPrincipalType
  }
}

// The person who creates and renews the certificate and runs the CLI against this deployment.
resource operatorVaultRoles 'Microsoft.Authorization/roleAssignments@2022-04-01' = [
  for role in [roles.keyVaultCertificatesOfficer, roles.keyVaultReader]: if (!empty(operatorPrincipalId)) {
    name: guid(vault.id, operatorPrincipalId, role)
    scope: vault
    properties: {
      roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', role)
      principalId: operatorPrincipalId
      principalType: operatorPrincipalType
    }
  }
]

resource operatorStorageRoles 'Microsoft.Authorization/roleAssignments@2022-04-01' = [
  for role in [roles.storageQueueDataContributor, roles.storageBlobDataContributor]: if (!empty(operatorPrincipalId)) {
    name: guid(storage.id, operatorPrincipalId, role)
    scope: storage
    properties: {
      roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', role)
      principalId: operatorPrincipalId
      principalType: operatorPrincipalType
    }
  }
]

// ---------------------------------------------------------------------------------------------
// Monitoring: Log Analytics + workspace-based Application Insights (Entra ID ingestion only)
// ---------------------------------------------------------------------------------------------

resource workspace 'Microsoft.OperationalInsights/workspaces@2023-09-01' = {
  name: workspaceName
  location: location
  tags: tags
  properties: {
    sku: {
      name: 'PerGB2018'
    }
    retentionInDays: logRetentionDays
  }
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' = {
  name: appInsightsName
  location: location
  tags: tags
  kind: 'web'
  properties: {
    Application_Type: 'web'
    WorkspaceResourceId: workspace.id
    IngestionMode: 'LogAnalytics'
    DisableLocalAuth: true
  }
}

// With local auth off, the host sends telemetry with the identity (APPLICATIONINSIGHTS_AUTHENTICATION_STRING).
resource appInsightsPublisher 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(appInsights.id, identity.id, roles.monitoringMetricsPublisher)
  scope: appInsights
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', roles.monitoringMetricsPublisher)
    principalId: identity.properties.principalId
    principalType: 'ServicePrincipal'
  }
}

// ---------------------------------------------------------------------------------------------
// Function app: Flex Consumption, Node.js 22
// ---------------------------------------------------------------------------------------------

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  name: planName
  location: location
  tags: tags
  kind: 'functionapp'
  sku: {
    name: 'FC1'
    tier: 'FlexConsumption'
  }
  properties: {
    reserved: true
  }
}

resource functionApp 'Microsoft.Web/sites@2024-04-01' = {
  name: functionAppName
  location: location
  tags: tags
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identity.id}': {}
    }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    // Key Vault references in app settings (EXPIRY_WEBHOOK_URL) resolve with this identity.
    keyVaultReferenceIdentity: identity.id
    siteConfig: {
      minTlsVersion: '1.2'
    }
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${storage.properties.primaryEndpoints.blob}${deploymentContainer}'
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identity.id
          }
        }
      }
      scaleAndConcurrency: {
        maximumInstanceCount: maximumInstanceCount
        instanceMemoryMB: instanceMemoryMB
        alwaysReady: alwaysReady
      }
      runtime: {
        name: 'node'
        version: '22'
      }
    }
  }
  dependsOn: [
    deploymentPackageContainer
  ]
}

// app-settings:start (test/infra.test.ts reads the keys between these markers)
// FUNCTIONS_WORKER_RUNTIME and FUNCTIONS_EXTENSION_VERSION are deliberately absent: on Flex
// Consumption the runtime comes from functionAppConfig, and those settings are rejected or ignored.
var hostSettings = {
  // Host storage (triggers, leases) through the user-assigned identity. The app reads the same
  // three URIs for its queue, tables and blobs (shared/config.ts).
  AzureWebJobsStorage__credential: 'managedidentity'
  AzureWebJobsStorage__clientId: identity.properties.clientId
  AzureWebJobsStorage__queueServiceUri: storage.properties.primaryEndpoints.queue
  AzureWebJobsStorage__tableServiceUri: storage.properties.primaryEndpoints.table
  AzureWebJobsStorage__blobServiceUri: storage.properties.primaryEndpoints.blob
  // DefaultAzureCredential (shared/auth/azureCredential.ts) uses the user-assigned identity with this client id.
  AZURE_CLIENT_ID: identity.properties.clientId
  APPLICATIONINSIGHTS_CONNECTION_STRING: appInsights.properties.ConnectionString
  APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'ClientId=${identity.properties.clientId};Authorization=AAD'
}

var mailerSettings = {
  MAIL_QUEUE: mailQueue
  MAIL_FROM: empty(mailFrom) ? smtpUser : mailFrom
  AUTH_METHOD: authMethod
  TRANSPORT: transport
  KEY_VAULT_URL: vault.properties.vaultUri
  SMTP_USER: smtpUser
  ATTACHMENT_CONTAINER: attachmentContainer
  ALLOWED_RECIPIENT_DOMAINS: allowedRecipientDomains
  EXPIRY_CHECK_SCHEDULE: expiryCheckSchedule
  EXPIRY_WARN_DAYS: expiryWarnDays
  EXPIRY_CRITICAL_DAYS: string(expiryCriticalDays)
  EXPIRY_WATCH_NAMES: expiryWatchNames
  EXPIRY_CHECK_APP_REGISTRATION: expiryCheckAppRegistration
  EXPIRY_ALERT_TO: expiryAlertTo
}

// Only the settings of the chosen method: the app ignores the others, but people read them.
var microsoftSettings = {
  TENANT_ID: tenantId
  CLIENT_ID: appClientId
}
var certificateSettings = {
  CERT_NAME: certificateName
  CERT_SIGNING: signingMode == 'remote' ? 'vault' : 'local'
}
var clientSecretSetting = {
  CLIENT_SECRET_NAME: clientSecretName
}
var googleKeySetting = {
  GOOGLE_KEY_NAME: googleKeySecretName
}
var mailboxPasswordSetting = {
  MAILBOX_PASSWORD_NAME: mailboxPasswordSecretName
}
var refreshTokenSetting = {
  REFRESH_TOKEN_NAME: refreshTokenSecretName
}
var authSettings = union(
  authMethod == 'google-service-account' ? {} : microsoftSettings,
  usesCertificate ? certificateSettings : {},
  empty(clientSecretName) ? {} : clientSecretSetting,
  empty(googleKeySecretName) ? {} : googleKeySetting,
  empty(mailboxPasswordSecretName) ? {} : mailboxPasswordSetting,
  empty(refreshTokenSecretName) ? {} : refreshTokenSetting
)

var webhookSetting = {
  EXPIRY_WEBHOOK_URL: '@Microsoft.KeyVault(VaultName=${vault.name};SecretName=${expiryWebhookSecretName})'
}
var webhookSettings = empty(expiryWebhookSecretName) ? {} : webhookSetting

// Settings not set here (defaults apply): TOKEN_URL, TOKEN_SCOPE, GRAPH_URL, GRAPH_MAX_CONCURRENCY, DAILY_RECIPIENT_LIMIT, MAILBOX, ASSERTION_ALG, AUTHORITY_HOST, CLIENT_AUTH, SMTP_HOST, SMTP_PORT, SMTP_MAX_CONNECTIONS, SEND_RATE_PER_MINUTE, SEND_RATE_WINDOW_SECONDS, MAX_DEQUEUE_COUNT, RETRY_BASE_SECONDS, RETRY_MAX_SECONDS, MAX_MESSAGE_BYTES, SEND_LEDGER
// Settings not set here (read only by `queue-mailer worker`; host.json sets the host's equivalents): LEASE_SECONDS, WORKER_BATCH_SIZE
// Settings not set here (not used in Azure: identity-based storage and a Key Vault certificate instead): AzureWebJobsStorage, CERT_PATH, CERT_PASSWORD
// Settings not set here (secrets stay in the vault and are read by name; files are for local runs): CLIENT_SECRET, MAILBOX_PASSWORD, GOOGLE_KEY_PATH, REFRESH_TOKEN_PATH
// Settings not set here (read only by `queue-mailer authorize`, run by an operator on their own machine; defaults apply): AUTHORIZE_URL, DEVICE_CODE_URL, AUTHORIZE_REDIRECT_PORT
// Settings not set here (read only by `queue-mailer doctor --dns`, run by an operator): DNS_SERVERS
// Settings not set here (optional features, off by default; add them as app settings to use them): EVENTS_QUEUE, TEMPLATE_DIR, TEMPLATE_CONTAINER
// Settings not set here (bounce watch and suppression list; defaults apply, IMAP_HOST follows AUTH_METHOD): BOUNCES_ENABLED, BOUNCE_CHECK_SCHEDULE, IMAP_HOST, IMAP_PORT, IMAP_SCOPE, BOUNCE_FOLDER, BOUNCE_DONE_FOLDER, SOFT_BOUNCE_LIMIT, SUPPRESSION_CHECK, SUPPRESSION_REFRESH_SECONDS
// app-settings:end

resource appSettings 'Microsoft.Web/sites/config@2024-04-01' = {
  parent: functionApp
  name: 'appsettings'
  properties: union(hostSettings, mailerSettings, authSettings, webhookSettings, extraAppSettings)
  // Apply the settings once the identity can use them, so the host's first start finds its roles.
  dependsOn: [
    appStorageRoles
    appVaultRoleAssignments
    appRefreshTokenWriter
    appInsightsPublisher
    queues
    tables
    attachmentsContainer
  ]
}

// ---------------------------------------------------------------------------------------------
// Alerts
// ---------------------------------------------------------------------------------------------
// All three are log search alerts on the Application Insights traces table, where the host and the
// handler's structured records land (host.json keeps traces out of sampling). Poison-queue growth
// is a log alert too. A metric alert on the queue service's QueueMessageCount would count every queue
// in the account together (the metric has no queue-name dimension) and is emitted only about once an
// hour, so it cannot tell a poisoned message from an ordinary backlog. Each message that reaches the
// poison queue leaves a trace: either the handler's "message.poisoned" record (with the reason
// code), or the host's "Moving message to queue '<queue>-poison'" line when an invocation failed on
// its last attempt. The alerts are stateful (autoMitigate): one notification when one fires and
// one when it resolves, even though the windows overlap.

resource actionGroup 'Microsoft.Insights/actionGroups@2023-01-01' = if (!empty(alertEmail)) {
  name: 'ag-${prefix}-${resourceToken}'
  location: 'global'
  tags: tags
  properties: {
    groupShortName: 'queuemailer'
    enabled: true
    emailReceivers: [
      {
        name: 'operator'
        emailAddress: alertEmail
        useCommonAlertSchema: true
      }
    ]
  }
}

var alertActions = {
  actionGroups: empty(alertEmail) ? [] : [actionGroup.id]
}

var expiryQuery = '''
traces
| where message contains '"event":"expiry.alert"'
| extend record = parse_json(substring(message, indexof(message, "{")))
| extend item = tostring(record.name), status = tostring(record.status), daysLeft = toint(record.daysLeft)
| project timestamp, item, status, daysLeft
'''

var poisonQueryTemplate = '''
traces
| where message contains '"event":"message.poisoned"' or message contains "Moving message to queue '{poisonQueue}'"
| extend record = iff(message contains '"event":"message.poisoned"', parse_json(substring(message, indexof(message, "{"))), dynamic(null))
| extend code = coalesce(tostring(record.error.code), "MAX_DEQUEUE_COUNT_REACHED")
| project timestamp, code
'''

var pausedQuery = '''
traces
| where message contains '"event":"circuit.open"'
| extend record = parse_json(substring(message, indexof(message, "{")))
| extend code = tostring(record.error.code)
| project timestamp, code
'''

resource expiryAlert 'Microsoft.Insights/scheduledQueryRules@2022-06-15' = {
  name: 'alert-${prefix}-expiry'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: 'queue-mailer: certificate or secret expiring'
    description: 'The expiry watch logged an "expiry.alert" record: a certificate or secret it watches (the sender\'s own certificate included) crossed a warning threshold, or is critical or expired. Run `queue-mailer expiry` for the list; renew as described in docs/deploy-azure.md.'
    severity: 2
    enabled: true
    scopes: [
      appInsights.id
    ]
    evaluationFrequency: 'PT1H'
    windowSize: 'PT2H'
    criteria: {
      allOf: [
        {
          query: expiryQuery
          timeAggregation: 'Count'
          dimensions: [
            {
              name: 'item'
              operator: 'Include'
              values: ['*']
            }
            {
              name: 'status'
              operator: 'Include'
              values: ['*']
            }
          ]
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: true
    actions: alertActions
  }
}

resource poisonAlert 'Microsoft.Insights/scheduledQueryRules@2022-06-15' = {
  name: 'alert-${prefix}-poison'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: 'queue-mailer: message moved to ${poisonQueue}'
    description: 'A message was written to the poison queue. The dimension "code" is the reason (for example MESSAGE_INVALID_ADDRESS, SMTP_RECIPIENT_REJECTED). See `queue-mailer poison list`, fix, then `queue-mailer poison requeue`.'
    severity: 2
    enabled: true
    scopes: [
      appInsights.id
    ]
    evaluationFrequency: 'PT15M'
    windowSize: 'PT30M'
    criteria: {
      allOf: [
        {
          query: replace(poisonQueryTemplate, '{poisonQueue}', poisonQueue)
          timeAggregation: 'Count'
          dimensions: [
            {
              name: 'code'
              operator: 'Include'
              values: ['*']
            }
          ]
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: true
    actions: alertActions
  }
}

resource pausedAlert 'Microsoft.Insights/scheduledQueryRules@2022-06-15' = {
  name: 'alert-${prefix}-paused'
  location: location
  tags: tags
  kind: 'LogAlert'
  properties: {
    displayName: 'queue-mailer: sending paused (setup fault)'
    description: 'The sender stopped taking messages because its setup is broken (for example TOKEN_AADSTS700027 after the certificate was renewed but not uploaded to the app registration, KEYVAULT_ACCESS_DENIED, SMTP_AUTH_REJECTED). Messages wait in the queue and are not poisoned. The dimension "code" names the fault.'
    severity: 1
    enabled: true
    scopes: [
      appInsights.id
    ]
    evaluationFrequency: 'PT15M'
    windowSize: 'PT30M'
    criteria: {
      allOf: [
        {
          query: pausedQuery
          timeAggregation: 'Count'
          dimensions: [
            {
              name: 'code'
              operator: 'Include'
              values: ['*']
            }
          ]
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: true
    actions: alertActions
  }
}

// ---------------------------------------------------------------------------------------------
// Outputs
// ---------------------------------------------------------------------------------------------

output functionAppName string = functionApp.name
output storageAccountName string = storage.name
output keyVaultName string = vault.name
output keyVaultUri string = vault.properties.vaultUri
output identityClientId string = identity.properties.clientId
output identityPrincipalId string = identity.properties.principalId
output queueServiceUri string = storage.properties.primaryEndpoints.queue
output tableServiceUri string = storage.properties.primaryEndpoints.table
output blobServiceUri string = storage.properties.primaryEndpoints.blob
output mailQueue string = mailQueue
output certificateName string = certificateName
output applicationInsightsName string = appInsights.name
